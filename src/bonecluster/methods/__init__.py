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


def _method_files() -> dict[str, Path]:
    """Method name -> its module file (``foo_bar.py`` holds ``foo-bar``); ``_*.py`` are shared code."""
    return {path.stem.replace("_", "-"): path for path in sorted(_HERE.glob("*.py")) if not path.stem.startswith("_")}


def available() -> dict[str, str]:
    """Method name -> one-line summary (its module docstring's first line), read from the files
    without importing them (so that ``--help`` does not wait for torch)."""
    out = {}
    for name, path in _method_files().items():
        doc = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
        out[name] = doc.splitlines()[0] if doc else ""
    return out


def method_names() -> tuple[str, ...]:
    """The registered names, the paper's DeepCluster first."""
    return tuple(sorted(_method_files(), key=lambda n: (n != DEFAULT, n)))


def get_method(name: str) -> type[Method]:
    """The :class:`~bonecluster.methods._base.Method` subclass named ``name``, importing its module
    (with the modules it builds on, and torch) only now; a clear error for an unknown name."""
    from bonecluster.methods._base import registered

    files = _method_files()
    if name not in files:
        raise ValueError(f"config method={name!r}: choose one of {', '.join(method_names())}")
    importlib.import_module(f"{__name__}.{files[name].stem}")
    cls = registered(name)
    if cls is None:
        raise ValueError(f"methods/{files[name].name} registers no method named {name!r}")
    return cls
