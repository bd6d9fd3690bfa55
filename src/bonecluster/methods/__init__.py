"""Clustering methods, one module each, registered by name: ``--method NAME`` picks one.

The module ``methods/foo_bar.py`` holds the method ``foo-bar``: a :class:`Method` subclass
decorated with ``@register("foo-bar")``. Its docstring's first line is the method's summary in
``bonecluster train --help``. Modules whose name starts with ``_`` are shared code, not methods.
Adding a method is one file here plus its test (docs/DEVELOPING.md); nothing else changes.
The interface, and what the training loop lends a method, are in :mod:`bonecluster.methods._base`.
This package's own module imports nothing heavy, so that the CLI can list the methods quickly.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # for the annotation only: importing _base loads torch
    from bonecluster.methods._base import Method

__all__ = ["DEFAULT", "available", "get_method", "method_names"]

_HERE = Path(__file__).parent
DEFAULT = "deepcluster"


def available() -> dict[str, str]:
    """Method name -> one-line summary, read from the module files without importing them
    (so that ``--help`` does not wait for torch)."""
    out = {}
    for path in sorted(_HERE.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        out[path.stem.replace("_", "-")] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def method_names() -> tuple[str, ...]:
    """The registered names, the paper's DeepCluster first."""
    names = sorted(available())
    return tuple(sorted(names, key=lambda n: n != DEFAULT))


def get_method(name: str) -> type[Method]:
    """The :class:`~bonecluster.methods._base.Method` subclass named ``name``, importing its module
    (with the modules it builds on, and torch) only now; a clear error for an unknown name."""
    from bonecluster.methods._base import registered

    if name not in available():
        raise ValueError(f"config method={name!r}: choose one of {', '.join(method_names())}")
    importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    cls = registered(name)
    if cls is None:
        raise ValueError(f"methods/{name.replace('-', '_')}.py registers no method named {name!r}")
    return cls
