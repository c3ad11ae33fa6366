"""Every public name has a docstring (the API reference in docs/ is built from them).

Public names: everything ``funcopt`` exports (its star-imported modules' ``__all__`` and its
explicit re-exports), and the ``__all__`` (or public attributes) of ``funcopt.schedules``,
``funcopt.solvers``, ``funcopt.func``, ``funcopt.testing`` and ``funcopt.engine``. Functions
and classes need their own ``__doc__`` (a NamedTuple's generated ``Name(field, ...)`` does not
count); constants and type aliases need an attribute docstring: a string literal right after
the assignment in the module that defines them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from functools import cache
from pathlib import Path

import pytest

import funcopt

MODULES = ["funcopt", "funcopt.schedules", "funcopt.solvers", "funcopt.func", "funcopt.testing",
           "funcopt.engine"]


def _public(module_name: str) -> list[tuple[str, str]]:
    mod = importlib.import_module(module_name)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    return [(module_name, n) for n in names if not inspect.ismodule(getattr(mod, n))]


@cache
def _attribute_docstrings() -> frozenset[str]:
    """Names assigned at the top level of a funcopt module and followed by a string literal."""
    found = set()
    root = Path(funcopt.__file__).parent
    for info in pkgutil.walk_packages([str(root)], "funcopt."):
        path = root.joinpath(*info.name.split(".")[1:])
        path = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        body = ast.parse(path.read_text()).body
        for stmt, nxt in zip(body, body[1:]):
            targets = (stmt.targets if isinstance(stmt, ast.Assign)
                       else [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
            documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                          and isinstance(nxt.value.value, str) and nxt.value.value.strip())
            if documented:
                found.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(found)


def _has_docstring(name: str, obj: object) -> bool:
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
        doc = obj.__doc__ or ""
        generated = (inspect.isclass(obj) and issubclass(obj, tuple)
                     and doc.startswith(f"{obj.__name__}("))
        return bool(doc.strip()) and not generated
    if callable(obj) and type(obj).__module__.startswith("funcopt") and type(obj).__doc__:
        return True  # an instance of a documented funcopt class (a Schedule object, ...)
    return name in _attribute_docstrings()


PUBLIC = sorted({pair for m in MODULES for pair in _public(m)})


def test_the_public_api_is_not_empty():
    names = {n for _, n in PUBLIC}
    assert len(PUBLIC) > 150 and {"chain", "adamw", "GradientTransformation", "leaves",
                                  "check_transform", "warmup_cosine_decay"} <= names


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_a_docstring(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert _has_docstring(name, obj), (
        f"{module}.{name} has no docstring: write one (for a constant or type alias, a string "
        "literal on the line after its assignment)")


def test_the_check_sees_a_missing_docstring():
    """The check itself: a NamedTuple with only its generated docstring, a bare function and an
    undocumented constant all fail it."""
    from typing import NamedTuple

    class Bare(NamedTuple):
        x: int

    def bare():
        pass

    assert not _has_docstring("Bare", Bare)
    assert not _has_docstring("bare", bare)
    assert not _has_docstring("NOT_A_FUNCOPT_NAME", (1, 2))
    assert _has_docstring("SOLVER_NAMES", funcopt.solvers.SOLVER_NAMES)
