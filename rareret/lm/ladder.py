"""Named model sizes: the paper's OLMo ladder (docs/method.md §6.2) plus small CPU rungs.

A rung is (layers, d_model, fused MLP up-projection size, heads, default vocabulary). The paper
prints parameter counts in its Table 1; those numbers were not available here, so the counts come
from `config.param_count` (a formula, tested against the initialised tree). At vocab 50,304 the rung
names follow OLMo's count without the input embedding (`olmo_non_embedding`: 3.7M, 19.1M, 320M,
1.18B, 4.5B). The CPU rungs default to a 512-token vocabulary; pass `vocab_size` to match a
tokenizer.

`python -m rareret.lm.ladder [--variant olmo2]` prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses

from rareret.errors import require
from rareret.lm.config import VARIANTS, OlmoConfig, param_count

PAPER_VOCAB = 50304
CPU_VOCAB = 512


@dataclasses.dataclass(frozen=True)
class Rung:
    n_layers: int
    d_model: int
    mlp_up: int  # Fused up-projection size, mlp_ratio · d_model.
    n_heads: int
    vocab_size: int


LADDER = {
    "tiny": Rung(2, 32, 256, 4, CPU_VOCAB),
    "cpu-small": Rung(4, 128, 1024, 4, CPU_VOCAB),
    "4M": Rung(8, 64, 512, 8, PAPER_VOCAB),
    "20M": Rung(16, 192, 1536, 8, PAPER_VOCAB),
    "300M": Rung(16, 1024, 8192, 16, PAPER_VOCAB),
    "1B": Rung(16, 2048, 16384, 16, PAPER_VOCAB),
    "4B": Rung(16, 4096, 32768, 32, PAPER_VOCAB),
}
_SIZE_FIELDS = ("d_model", "n_layers", "n_heads", "mlp_ratio", "vocab_size")


def config_for(name: str, vocab_size: int | None = None, **overrides) -> OlmoConfig:
    """The `OlmoConfig` of rung `name`; `overrides` set non-size fields (variant, dtypes, ...)."""
    require(name in LADDER, f"ladder rung {name!r} is unknown; known rungs: {', '.join(LADDER)}")
    fields = {f.name for f in dataclasses.fields(OlmoConfig)} - set(_SIZE_FIELDS)
    unknown = sorted(set(overrides) - fields)
    require(not unknown,
            f"config_for({name!r}): cannot override {unknown}; allowed: {sorted(fields)}")
    rung = LADDER[name]
    return OlmoConfig(
        d_model=rung.d_model, n_layers=rung.n_layers, n_heads=rung.n_heads,
        mlp_ratio=rung.mlp_up // rung.d_model,
        vocab_size=rung.vocab_size if vocab_size is None else vocab_size, **overrides)


def _human(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def format_ladder(variant: str = "olmo") -> str:
    """The ladder as a text table with parameter counts (see `config.param_count`)."""
    header = ("rung", "layers", "d_model", "mlp_up", "heads", "vocab", "total", "non_embedding",
              "olmo_non_emb", "≈")
    rows = [header]
    for name in LADDER:
        config = config_for(name, variant=variant)
        counts = param_count(config)
        rows.append((name, config.n_layers, config.d_model, config.mlp_ratio * config.d_model,
                     config.n_heads, config.vocab_size, f"{counts['total']:,}",
                     f"{counts['non_embedding']:,}", f"{counts['olmo_non_embedding']:,}",
                     _human(counts["olmo_non_embedding"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [f"variant {variant}"]
    lines += ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the OLMo model ladder.")
    parser.add_argument("--variant", choices=VARIANTS, default="olmo")
    print(format_ladder(parser.parse_args(argv).variant))


if __name__ == "__main__":
    main()
