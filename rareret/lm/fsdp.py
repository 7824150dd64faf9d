"""Explicit FSDP for the LM train step (and the gradients of the records' interference
measurements, `gradients.fsdp_gradients`): the loss and its gradients computed in a
`jax.shard_map` over the mesh, each device gathering one parameter at a time where the model
uses it and its gradient summed straight into the device's shard.

Why not leave it to GSPMD: on XLA's CPU backend the partitioner sums a sharded parameter's
gradient with an all-reduce of the whole float32 gradient, then slices the device's shard. At
the step's peak every device then held every parameter's whole gradient (1.2 GB of the 300M
rung's 4-device peak). Here the gradient of a gathered parameter is the transpose of its
all-gather, a reduce-scatter, produced block by block in the backward pass.

Used for meshes that split parameters over "fsdp" only (tensor = 1); tensor-parallel meshes
stay with GSPMD.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec

from rareret import sharding
from rareret.lm import model as lm_model
from rareret.lm.config import OlmoConfig

BATCH_AXES = dict(sharding.RULES)["batch"]  # The mesh axes a batch's rows are split over.


def applies(mesh: Mesh) -> bool:
    """Whether `mesh` splits parameters over "fsdp" alone, the case this module handles."""
    return mesh.shape[lm_model.FSDP_AXIS] > 1 and mesh.shape["tensor"] == 1


def param_mesh_specs(config: OlmoConfig, mesh: Mesh):
    """The parameters' `PartitionSpec`s on `mesh`, as the train state's shardings have them."""
    return jax.tree.map(lambda s: s.spec, sharding.logical_sharding(
        lm_model.logical_partition_specs(config), mesh))


def loss_and_grads(config: OlmoConfig, mesh: Mesh, param_specs, params, tokens_BxL):
    """(mean next-token loss, its gradients sharded as `param_specs`) of the global batch
    `tokens_BxL` (rows split over `BATCH_AXES`), as `jax.value_and_grad` of
    `lm_model.next_token_loss` gives them unsharded, up to float32 summation order."""
    devices = batch_devices(mesh)

    def local(config, params, tokens_bxL):
        loss, grads = jax.value_and_grad(
            lambda p: lm_model.next_token_loss(config, p, tokens_bxL))(params)
        # The global loss is the mean of the devices' (equal-sized) means, its gradient the
        # mean of theirs.
        grads = jax.tree.map(lambda g: g / devices, sum_gradients(grads, param_specs))
        return jax.lax.pmean(loss, BATCH_AXES), grads

    return per_device(config, mesh, local, (params, tokens_BxL),
                      (param_specs, PartitionSpec(BATCH_AXES)), (PartitionSpec(), param_specs))


def per_device(config: OlmoConfig, mesh: Mesh, local, args, in_specs, out_specs):
    """`local(config, *args)` in a `jax.shard_map` over `mesh`, on the shards of `args` (split
    as `in_specs`; parameters split as the train state's, which the model then gathers where
    it uses them: `config.fsdp_shards` is set to the mesh's)."""
    local_config = dataclasses.replace(config, fsdp_shards=mesh.shape[lm_model.FSDP_AXIS])

    def manual(*args):
        # Every mesh axis is manual in here: the model's logical constraints must not apply.
        with nn.logical_axis_rules(()):
            return local(local_config, *args)

    # check_vma=False: the sums over devices are the ones written here and in the model.
    return jax.shard_map(manual, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


def sum_gradients(grads, specs):
    """Inside `per_device`: each device's gradients (of its rows' loss) summed over the
    devices, sharded as `specs` (a parameter's spec, or it led by None for an extra leading
    axis). A split parameter's gradient was summed over "fsdp" by the model's reduce-scatters;
    the rest is summed here."""
    return jax.tree.map(lambda g, spec: _sum_over(g, _unsplit_batch_axes(spec)), grads, specs)


def batch_devices(mesh: Mesh) -> int:
    """The devices a batch's rows are split over."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _unsplit_batch_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """The batch axes a parameter with mesh `spec` is not split over."""
    split = {a for entry in spec for a in sharding.entry_axes(entry)}
    return tuple(a for a in BATCH_AXES if a not in split)


def _sum_over(x, axes: tuple[str, ...]):
    return jax.lax.psum(x, axes) if axes else x
