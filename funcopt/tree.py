"""Tree utilities, ``fo.tree.*``, with optax's ``optax.tree`` names and meanings.

Trees are optree pytrees of tensors (dict, list, tuple, NamedTuple; ``None`` is an empty
node). Reductions return 0-d tensors and never read a value on the host. ``get``/``set`` find
a node by its key or field name anywhere in the tree (a dict key, a NamedTuple field, or the
NamedTuple's class name), as ``optax.tree.get``/``set`` do.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from typing import Any

import optree
import torch

from funcopt.base import tree_check_structure, tree_leaves

Tensor = torch.Tensor

__all__ = [
    "where", "clip", "max", "min", "sum", "mul", "div", "norm", "size", "dtype", "cast_like",
    "get", "get_all_with_path", "set", "allclose", "bias_correction", "update_moment",
    "update_moment_per_elem_norm", "update_infinity_moment",
]


def _map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    for i, other in enumerate(rest):
        tree_check_structure(tree, other, ("the first tree", f"tree #{i + 2}"))
    return optree.tree_map(fn, tree, *rest)


def where(condition: Any, tree_x: Any, tree_y: Any) -> Any:
    """``torch.where(condition, x, y)`` leaf by leaf; ``condition`` a bool (0-d) tensor."""
    return _map(lambda x, y: torch.where(condition, x, y), tree_x, tree_y)


def clip(tree: Any, min_value: Any = None, max_value: Any = None) -> Any:
    """Every leaf clamped to ``[min_value, max_value]`` (either may be None)."""
    return optree.tree_map(lambda x: torch.clamp(x, min_value, max_value), tree)


def _reduce(tree: Any, fn: Callable[[Tensor], Tensor], combine: Callable[[Tensor], Tensor],
            empty: float) -> Tensor:
    parts = [fn(x) for x in tree_leaves(tree) if x.numel() > 0]
    if not parts:
        return torch.tensor(empty)
    dt = builtins.max((p.dtype for p in parts), key=lambda d: torch.finfo(d).bits
                      if d.is_floating_point else 0)
    return combine(torch.stack([p.to(dt) for p in parts]))


def max(tree: Any) -> Tensor:  # noqa: A001  (optax's name)
    """The largest entry of all leaves (``-inf`` for an empty tree)."""
    return _reduce(tree, torch.max, torch.max, -math.inf)


def min(tree: Any) -> Tensor:  # noqa: A001  (optax's name)
    """The smallest entry of all leaves (``inf`` for an empty tree)."""
    return _reduce(tree, torch.min, torch.min, math.inf)


def sum(tree: Any) -> Tensor:  # noqa: A001  (optax's name)
    """The sum of all entries of all leaves (0 for an empty tree)."""
    return _reduce(tree, torch.sum, torch.sum, 0.0)


def mul(tree_x: Any, tree_y: Any) -> Any:
    """``x * y`` leaf by leaf."""
    return _map(torch.mul, tree_x, tree_y)


def div(tree_x: Any, tree_y: Any) -> Any:
    """``x / y`` leaf by leaf."""
    return _map(torch.div, tree_x, tree_y)


def norm(tree: Any, ord: Any = None, squared: bool = False) -> Tensor:  # noqa: A002
    r"""The norm of all leaves together: ``ord`` None or 2 (Euclidean), 1, or ``inf``
    (also ``"inf"``/``"infinity"``); ``squared`` returns its square. Raises ValueError for
    another ``ord`` (as optax)."""
    if ord is None or ord == 2:
        sq = sum(optree.tree_map(lambda x: x * x, tree))
        return sq if squared else torch.sqrt(sq)
    if ord == 1:
        out = sum(optree.tree_map(torch.abs, tree))
    elif ord in (math.inf, "inf", "infinity"):
        out = max(optree.tree_map(torch.abs, tree))
    else:
        raise ValueError(f"fo.tree.norm: unsupported ord={ord!r}; use None, 1, 2 or inf")
    return out * out if squared else out


def size(tree: Any) -> int:
    """The number of entries of all leaves."""
    return builtins.sum(x.numel() for x in tree_leaves(tree))


def dtype(tree: Any, mixed_dtype_handler: str | None = None) -> torch.dtype:
    """The dtype of the leaves. With mixed dtypes: ``None`` raises ValueError, ``"promote"``
    gives torch's promotion, ``"highest"``/``"lowest"`` the most/least precise."""
    dts = [x.dtype for x in tree_leaves(tree)]
    if not dts:
        return torch.get_default_dtype()
    if mixed_dtype_handler is None:
        if any(d != dts[0] for d in dts):
            raise ValueError(f"fo.tree.dtype: the leaves have dtypes {sorted(map(str, set(dts)))}; "
                             "pass mixed_dtype_handler='promote', 'highest' or 'lowest'")
        return dts[0]
    if mixed_dtype_handler == "promote":
        out = dts[0]
        for d in dts[1:]:
            out = torch.promote_types(out, d)
        return out
    bits = {d: (torch.finfo(d).bits if d.is_floating_point else torch.iinfo(d).bits) for d in dts}
    if mixed_dtype_handler == "highest":
        return builtins.max(dts, key=lambda d: bits[d])
    if mixed_dtype_handler == "lowest":
        return builtins.min(dts, key=lambda d: bits[d])
    raise ValueError(f"fo.tree.dtype: mixed_dtype_handler={mixed_dtype_handler!r}; use None, "
                     "'promote', 'highest' or 'lowest'")


def cast_like(tree: Any, other_tree: Any) -> Any:
    """Each leaf of ``tree`` in the dtype of the matching leaf of ``other_tree``."""
    return _map(lambda x, o: x.to(o.dtype), tree, other_tree)


def allclose(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False) -> bool:
    """Whether every pair of leaves is ``torch.allclose`` (reads the answer on the host)."""
    return all(torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan)
               for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def bias_correction(moment: Any, decay: Any, count: Any) -> Any:
    r"""``moment / (1 - decay**count)`` leaf by leaf."""
    c = 1 - decay**count
    return optree.tree_map(lambda t: t / (c.to(t.dtype) if isinstance(c, Tensor) else c), moment)


def update_moment(updates: Any, moments: Any, decay: Any, order: int) -> Any:
    r"""``(1 - decay) * g**order + decay * m`` leaf by leaf."""
    return _map(lambda g, m: (1 - decay) * g**order + decay * m, updates, moments)


def update_moment_per_elem_norm(updates: Any, moments: Any, decay: Any, order: int) -> Any:
    r"""``(1 - decay) * g**order + decay * m`` leaf by leaf: for real leaves the same as
    :func:`update_moment` (optax's per-element norm differs only for complex leaves, which
    funcopt's transforms do not take)."""
    return update_moment(updates, moments, decay, order)


def update_infinity_moment(updates: Any, moments: Any, decay: Any, eps: Any) -> Any:
    r"""``max(|g| + eps, decay * m)`` leaf by leaf (Adamax's moment)."""
    return _map(lambda g, m: torch.maximum(g.abs() + eps, decay * m), updates, moments)


# --------------------------------------------------------------------------- get / set by key


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    """``[(key, child)]`` of a dict, NamedTuple, list or tuple node; None for a leaf."""
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return list(zip(node._fields, node))
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return None


def _rebuild(node: Any, items: list[tuple[Any, Any]]) -> Any:
    if isinstance(node, dict):
        return type(node)(items)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*[v for _, v in items])
    return type(node)(v for _, v in items)


def get_all_with_path(tree: Any, key: Any, filtering: Callable[[tuple, Any], bool] | None = None,
                      _path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every ``(path, node)`` whose key (dict key, NamedTuple field) or NamedTuple class name is
    ``key``, outermost first, kept where ``filtering(path, node)`` is true (when given)."""
    found = []
    if isinstance(tree, tuple) and hasattr(tree, "_fields") and type(tree).__name__ == key and (
            filtering is None or filtering(_path, tree)):
        found.append((_path, tree))
    for k, child in _children(tree) or []:
        path = (*_path, k)
        if k == key and (filtering is None or filtering(path, child)):
            found.append((path, child))
        found.extend(get_all_with_path(child, key, filtering, path))
    return found


def get(tree: Any, key: Any, default: Any = None,
        filtering: Callable[[tuple, Any], bool] | None = None) -> Any:
    """The node named ``key`` (see :func:`get_all_with_path`); ``default`` when there is none;
    KeyError when there are several (narrow them with ``filtering``)."""
    found = get_all_with_path(tree, key, filtering)
    if len(found) > 1:
        raise KeyError(f"fo.tree.get: found {len(found)} nodes named {key!r} (at "
                       f"{[p for p, _ in found]}); pass filtering=(path, node) -> bool")
    return found[0][1] if found else default


def set(tree: Any, filtering: Callable[[tuple, Any], bool] | None = None, /,  # noqa: A001
        **kwargs: Any) -> Any:
    """A copy of ``tree`` with every node named by a keyword replaced by its value
    (``fo.tree.set(state, learning_rate=torch.tensor(0.1))``). KeyError when a name is found
    nowhere."""
    for key in kwargs:
        if not get_all_with_path(tree, key, filtering):
            raise KeyError(f"fo.tree.set: found no node named {key!r}")

    def replace(node: Any, path: tuple) -> Any:
        if isinstance(node, tuple) and hasattr(node, "_fields") and type(node).__name__ in kwargs \
                and (filtering is None or filtering(path, node)):
            return kwargs[type(node).__name__]
        kids = _children(node)
        if kids is None:
            return node
        items = []
        for k, child in kids:
            p = (*path, k)
            hit = isinstance(k, str) and k in kwargs and (filtering is None or filtering(p, child))
            items.append((k, kwargs[k] if hit else replace(child, p)))
        return _rebuild(node, items)

    return replace(tree, ())
