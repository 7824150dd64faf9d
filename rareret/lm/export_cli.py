"""`rareret-export WORKDIR [--step N] --out DIR`: an LM run's checkpoint as a transformers model.

Restores checkpoint N (default: the latest) of the LM run in WORKDIR as `rareret-probe` does
(`probe_cli.restore_params`) and writes DIR with

  config.json, model.safetensors  `OlmoForCausalLM` / `Olmo2ForCausalLM` (`hf_interop`), its
                                  `eos_token_id` set to the tokenizer's EOS
  tokenizer.json, …               the run's tokenizer (WORKDIR/tokenizer.json, or
                                  `LmTrain.tokenizer`) as a `PreTrainedTokenizerFast`, EOS
                                  `<|endoftext|>`; a run on `.npy` token files has none

so `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it.
The model's vocabulary is the tokenizer's padded to a multiple of 128, as in training.

A WORKDIR without an LM run, a step without a checkpoint, an --out that is a file or a folder
that is not empty, or a missing torch extra ends the command with one line
`rareret-export: error: …` and exit status 2, before any model is built. The run's data and
tokenizer must still be where the run read them (`LmTrain.data`, `LmTrain.tokenizer`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from rareret.analysis.phase import read_spec
from rareret.errors import ConfigError, one_line, require
from rareret.lm import probe_cli
from rareret.lm.data import EOS

PROG = "rareret-export"


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of the other rareret commands."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Write a checkpoint of a rareret LM run as a "
                                            "transformers OLMo directory (config, weights, "
                                            "tokenizer).")
    parser.add_argument("workdir", metavar="WORKDIR", help="the LM run's directory")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    return parser


def check(args: argparse.Namespace):
    """(LmTrain, step, tokenizer path or None) of a valid request; ConfigError otherwise."""
    experiment = read_spec(args.workdir).get("experiment")
    require(experiment == "lm", f"{args.workdir} holds a run of experiment {experiment!r}; "
                                f"{PROG} exports LM runs only")
    spec = probe_cli.load_spec(args.workdir)
    available = probe_cli.checkpoint_steps(args.workdir)
    require(available, f"{args.workdir} holds no checkpoint yet")
    step = available[-1] if args.step is None else args.step
    require(step in available, f"--step={step}: no checkpoint at that step; checkpoints: "
                               f"{available}")
    require(not os.path.isfile(args.out) and not (os.path.isdir(args.out) and os.listdir(args.out)),
            f"--out={args.out} is a file or a folder that is not empty")
    require(importlib.util.find_spec("transformers") is not None,
            f"{PROG} needs transformers and torch: pip install -e '.[torch]'")
    tokenizer = spec.tokenizer or os.path.join(args.workdir, "tokenizer.json")
    return spec, step, tokenizer if os.path.isfile(tokenizer) else None


def export(workdir: str, spec, step: int, tokenizer_path: str | None, out: str) -> str:
    """Writes the export to `out`; returns the model class's name."""
    import transformers

    from rareret.lm import hf_interop

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar on stderr.
    program, params = probe_cli.restore_params(workdir, spec, step)
    model = hf_interop.to_hf_model(program.model.config, params)
    if tokenizer_path is not None:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_path,
                                                         eos_token=EOS)
        model.config.eos_token_id = tokenizer.eos_token_id
        tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return type(model).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        spec, step, tokenizer = check(args)
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
        name = export(args.workdir, spec, step, tokenizer, args.out)
    except ConfigError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {name} from step {step}"
          + ("" if tokenizer else " (no tokenizer: the run read token files)"))
    return 0


def run_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run_main()
