"""Reference tasks found naturally in text (docs/method.md §6.8): the paper's natural
counterparts of the injected tasks, scored by next-token loss alongside them.

- R_cmp: "it has increased from {x} to" → " {y}" with y > x (a larger number);
- R_add: "{x} + {y} =" → " {x + y}".

x and y are drawn from 0 … 99 (seeded; `NUM_INSTANCES` each). An instance is tokenised with the
run's tokenizer as one text (prompt + answer); the answer's tokens are those after the longest
common prefix with the prompt's own tokens. The recorded loss is the mean cross-entropy of all
answer tokens given everything before them. Rows are padded to one length; a weight marks the
loss positions that predict an answer token.

Shapes (docs/method.md "Shape letters"): B instances, L padded length.
"""

from __future__ import annotations

import numpy as np
import tokenizers

TEMPLATES = ("R_cmp", "R_add")
NUM_INSTANCES = 200
_SEED = 20260529


def _texts(name: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of template `name`."""
    pairs = []
    while len(pairs) < NUM_INSTANCES:
        x, y = (int(v) for v in rng.integers(0, 100, 2))
        if name == "R_cmp" and y > x:
            pairs.append((f"it has increased from {x} to", f" {y}"))
        elif name == "R_add":
            pairs.append((f"{x} + {y} =", f" {x + y}"))
    return pairs


def template_texts() -> dict[str, list[tuple[str, str]]]:
    """Per template, its (prompt, answer) instances."""
    rng = np.random.default_rng(_SEED)
    return {name: _texts(name, rng) for name in TEMPLATES}


def template_batches(tokenizer: tokenizers.Tokenizer) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per template: (tokens [B, L] int32, weights [B, L − 1] float32), weights[b, p] = 1 where
    position p predicts an answer token of instance b."""
    out = {}
    for name, texts in template_texts().items():
        rows, spans = [], []
        for prompt, answer in texts:
            prompt_ids, row = tokenizer.encode(prompt).ids, tokenizer.encode(prompt + answer).ids
            start = 0  # The answer starts where the whole text's tokens leave the prompt's.
            while start < min(len(row), len(prompt_ids)) and row[start] == prompt_ids[start]:
                start += 1
            rows.append(row)
            spans.append((max(start, 1), len(row)))
        length = max(len(r) for r in rows)
        tokens_BxL = np.zeros((len(rows), length), np.int32)
        weights = np.zeros((len(rows), length - 1), np.float32)
        for b, (row, (start, stop)) in enumerate(zip(rows, spans)):
            tokens_BxL[b, :len(row)] = row
            weights[b, start - 1:stop - 1] = 1.0  # Position p predicts token p + 1.
        out[name] = (tokens_BxL, weights)
    return out
