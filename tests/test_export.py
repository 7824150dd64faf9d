"""`rareret-export` (rareret/lm/export_cli.py) on a real tiny LM run: the directory loads with
`from_pretrained`, gives rareret's logits within 1e-4, and holds the checkpoint's trained
weights and the run's tokenizer; bad input gets one line."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm_corpus import golden_documents
from rareret.lm import data, export_cli, hf_interop, train
from rareret.lm import model as lm_model
from rareret.lm.spec import LmTrain
from rareret.run import Run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENIZER = pathlib.Path(__file__).resolve().parent / "data" / "lm_tokenizer.json"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """(workdir, spec) of a 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("export")
    shard = data.write_shard(root / "golden.jsonl.gz", golden_documents())
    spec = LmTrain(model="tiny", data=str(shard), tokenizer=str(TOKENIZER), seq_len=32,
                   global_batch=8, num_steps=4, warmup_steps=1, record_every=2,
                   checkpoint_every=2, learning_rate=1e-2, tasks=())
    Run(train.LmProgram(spec), str(root / "run"), show_progress=False).execute()
    return root / "run", spec


def checkpoint_params(workdir, spec, step):
    """The parameters of checkpoint `step`, restored with orbax directly."""
    program = train.LmProgram(spec)
    program.setup(str(workdir))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir.resolve() / "checkpoints" / str(step) / "state",
                                     program.abstract_state())
    return program, jax.tree.map(np.asarray, state["model"]["params"])


def export(capsys, *args) -> tuple[int, str, str]:
    code = export_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_round_trips_through_from_pretrained(lm_run, tmp_path, capsys):
    workdir, spec = lm_run
    code, out, err = export(capsys, workdir, "--out", tmp_path / "hf")
    assert code == 0, err
    assert out == f"wrote {tmp_path / 'hf'}: OlmoForCausalLM from step 4\n"
    program, params = checkpoint_params(workdir, spec, 4)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model) is transformers.OlmoForCausalLM
    tokens_BxL = np.random.default_rng(0).integers(0, 500, (2, 24))
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(tokens_BxL)).logits.numpy()
    logits = np.asarray(lm_model.apply(program.model.config, params, tokens_BxL))
    assert np.abs(logits).max() > 0.1  # Not a degenerate model.
    np.testing.assert_allclose(hf_logits, logits, rtol=0, atol=1e-4)
    # The trained weights of step 4, not the initial ones.
    _, exported = hf_interop.from_hf(tmp_path / "hf")
    initial = jax.tree.map(np.asarray, program.init()["model"]["params"])
    for got, trained, init in zip(jax.tree.leaves(exported), jax.tree.leaves(params),
                                  jax.tree.leaves(initial)):
        np.testing.assert_array_equal(got, trained)
        assert not np.array_equal(got, init)
    # The run's tokenizer, with its EOS.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = data.load_tokenizer(TOKENIZER)
    text = "def f(x): return x + 1"
    assert tokenizer(text)["input_ids"] == reference.encode(text).ids
    assert tokenizer.eos_token == data.EOS
    assert hf_model.config.eos_token_id == reference.token_to_id(data.EOS)


def test_step_chooses_the_checkpoint(lm_run, tmp_path, capsys):
    workdir, spec = lm_run
    code, out, err = export(capsys, workdir, "--step", 2, "--out", tmp_path / "hf")
    assert code == 0 and out.endswith("from step 2\n"), err
    _, exported = hf_interop.from_hf(tmp_path / "hf")
    _, params = checkpoint_params(workdir, spec, 2)
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)


def test_bad_input_is_one_line(lm_run, tmp_path, capsys):
    workdir, _ = lm_run
    synthetic = tmp_path / "sweep"
    synthetic.mkdir()
    (synthetic / "spec.json").write_text(json.dumps({"experiment": "synthetic"}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        ((workdir, "--step", 3, "--out", tmp_path / "a"),
         "--step=3: no checkpoint at that step; checkpoints: [2, 4]"),
        ((synthetic, "--out", tmp_path / "a"),
         f"{synthetic} holds a run of experiment 'synthetic'; rareret-export exports LM runs "
         f"only"),
        ((tmp_path / "nowhere", "--out", tmp_path / "a"),
         f"{tmp_path / 'nowhere'} holds no rareret run (no spec.json)"),
        ((workdir, "--out", tmp_path / "full"), "is a file or a folder that is not empty"),
        ((workdir,), "the following arguments are required: --out"),
    ]
    for args, message in cases:
        code, out, err = export(capsys, *args)
        assert code == 2 and out == "" and err.count("\n") == 1, (args, err)
        assert err.startswith("rareret-export: error: ") and message in err, (args, err)
    assert not (tmp_path / "a").exists()
