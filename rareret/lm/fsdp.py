"""Explicit FSDP for the LM train step: the loss and its gradients computed in a `jax.shard_map`
over the mesh, each device gathering one parameter at a time where the model uses it and its
gradient summed straight into the device's shard.

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


def loss_and_grads(config: OlmoConfig, mesh: Mesh, param_specs, params, tokens_BxL):
    """(mean next-token loss, its gradients sharded as `param_specs`) of the global batch
    `tokens_BxL` (rows split over `BATCH_AXES`), as `jax.value_and_grad` of
    `lm_model.next_token_loss` gives them unsharded, up to float32 summation order."""
    local_config = dataclasses.replace(config, fsdp_shards=mesh.shape[lm_model.FSDP_AXIS])
    devices = mesh.shape["data"] * mesh.shape[lm_model.FSDP_AXIS]

    def local(params, tokens_bxL):
        # Every mesh axis is manual in here: the model's logical constraints must not apply.
        with nn.logical_axis_rules(()):
            loss, grads = jax.value_and_grad(
                lambda p: lm_model.next_token_loss(local_config, p, tokens_bxL))(params)
        # The global loss is the mean of the devices' (equal-sized) means, its gradient the
        # mean of theirs: a split parameter's gradient was summed over "fsdp" by the model's
        # reduce-scatters, the rest is summed here.
        grads = jax.tree.map(lambda g, spec: _sum_over(g, _unsplit_batch_axes(spec)) / devices,
                             grads, param_specs)
        return jax.lax.pmean(loss, BATCH_AXES), grads

    # check_vma=False: the sums over devices are the ones written here and in the model.
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, PartitionSpec(BATCH_AXES)),
                         out_specs=(PartitionSpec(), param_specs), check_vma=False)(
        params, tokens_BxL)


def _unsplit_batch_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """The batch axes a parameter with mesh `spec` is not split over."""
    split = {a for entry in spec for a in sharding.entry_axes(entry)}
    return tuple(a for a in BATCH_AXES if a not in split)


def _sum_over(x, axes: tuple[str, ...]):
    return jax.lax.psum(x, axes) if axes else x
