"""The embedded default corpus: docstrings of the Python standard library (no downloads, ever).

One Dolma document per stdlib module (`id` = dotted module name), in sorted module order: the
module docstring, then each class/function docstring headed by its qualified name. Tests and
packages of data rather than prose (codec tables, pydoc's generated topics) are left out. The text
(about 2 MB on CPython 3.11) is deterministic for a given Python install.
"""

from __future__ import annotations

import ast
import gc
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from rareret.errors import require
from rareret.lm.data import Document, write_shard

SOURCE = "python-stdlib-docstrings"
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_SKIPPED = {"test", "tests", "idle_test", "encodings", "pydoc_data"}


def _module_files() -> list[tuple[str, Path]]:
    """(dotted name, source file) of the pure-Python stdlib modules, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for top in sys.stdlib_module_names.difference(_SKIPPED):
        if (root / f"{top}.py").is_file():
            files.append((top, root / f"{top}.py"))
        elif (root / top / "__init__.py").is_file():
            for f in (root / top).rglob("*.py"):
                parts = f.relative_to(root).with_suffix("").parts
                if not _SKIPPED.intersection(parts):
                    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                    files.append((name, f))
    return sorted(files)


def _sections(node: ast.AST, qualname: str) -> Iterator[str]:
    """'qualname\\ndocstring' for every class/function under `node`, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFS):
            name = f"{qualname}.{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                yield f"{name}\n{doc}"
            yield from _sections(child, name)
        elif not isinstance(child, ast.expr):  # expressions hold no definitions.
            yield from _sections(child, qualname)


def _parse(path: Path) -> ast.Module:
    """The syntax tree of `path`, quietly, with the cyclic GC paused (it slows parsing)."""
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old modules.
            return ast.parse(path.read_bytes(), filename=str(path))
    finally:
        gc.enable()


def stdlib_documents() -> Iterator[Document]:
    """One document per stdlib module that has any docstring."""
    for name, path in _module_files():
        tree = _parse(path)
        module_doc = ast.get_docstring(tree)
        sections = ([f"{name}\n{module_doc}"] if module_doc else []) + list(_sections(tree, name))
        if sections:
            yield Document(name, "\n\n".join(sections), SOURCE)


def write_default_corpus(path: str | os.PathLike) -> Path:
    """Writes the default corpus to `path` (a `.json.gz` shard) unless it exists; returns `path`."""
    path = Path(path)
    require(path.name.endswith(".json.gz"), f"{path}: the default corpus path must end in .json.gz")
    if not path.exists():
        write_shard(path, stdlib_documents())
    return path
