"""The hyperparameters in a transform's state, as :class:`funcopt.Optimizer`'s param groups see
them: found and set by the state's declared fields (:func:`funcopt.register_hyperparameters`),
and mapped to and from torch.optim's group keys (``lr``, ``betas``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from funcopt.base import OptState, hyperparameter_fields

__all__ = ["find_hyperparams", "set_hyperparams", "to_group", "from_group"]


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _scalar(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 0


def _declared(node: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, 0-d tensor) for the hyperparameter fields ``type(node)`` declares, in order; a
    dict-valued field (``inject_hyperparams``' ``hyperparams``) contributes its 0-d entries."""
    out: list[tuple[str, torch.Tensor]] = []
    for f in hyperparameter_fields(node):
        value = getattr(node, f)
        if isinstance(value, dict):
            out += [(str(k), v) for k, v in value.items() if _scalar(v)]
        elif _scalar(value):
            out.append((f, value))
    return out


def find_hyperparams(state: OptState) -> dict[str, torch.Tensor]:
    """The settable hyperparameters in a transform's state, by name.

    Found by the state's type: the fields each state class declares with
    :func:`funcopt.register_hyperparameters` (``learning_rate`` of ``scale_by_learning_rate``
    and schedule-free, the ``hyperparams`` dict of ``inject_hyperparams``). A field that only
    happens to be called ``learning_rate`` (KFAC's KL-clip step) is not a hyperparameter here.
    The first occurrence of a name, in depth-first order, wins.
    """
    found: dict[str, torch.Tensor] = {}

    def visit(node: Any) -> None:
        if _is_namedtuple(node):
            for name, value in _declared(node):
                found.setdefault(name, value)
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found


def set_hyperparams(state: OptState, values: dict[str, Any]) -> OptState:
    """A copy of ``state`` with the fields found by :func:`find_hyperparams` set to ``values``.

    Only the first occurrence of a name is written, the one :func:`find_hyperparams` exposes
    (for ``fo.muon`` the Muon learning rate; the AdamW branch's rate stays as built).

    Each new value takes the dtype and device of the field it replaces; names not in ``values``
    and all other leaves are kept (the same tensor objects, nothing is copied).
    """

    def cast_like(old: torch.Tensor, new: Any) -> torch.Tensor:
        if isinstance(new, torch.Tensor):
            return new.detach().to(dtype=old.dtype, device=old.device).reshape(())
        return torch.tensor(new, dtype=old.dtype, device=old.device)

    done: set[str] = set()

    def take(name: str) -> bool:
        """Write ``name`` only at its first occurrence, the one find_hyperparams exposes."""
        if name in values and name not in done:
            done.add(name)
            return True
        return False

    def visit(node: Any) -> Any:
        if _is_namedtuple(node):
            # the same order as find_hyperparams: this node's own fields, then its children
            declared = hyperparameter_fields(node)
            fields: dict[str, Any] = {}
            for f, v in zip(node._fields, node):
                if f in declared and isinstance(v, dict):
                    fields[f] = {k: cast_like(x, values[str(k)])
                                 if _scalar(x) and take(str(k)) else x for k, x in v.items()}
                elif f in declared and _scalar(v) and take(f):
                    fields[f] = cast_like(v, values[f])
                else:
                    fields[f] = v
            return type(node)(**{f: v if f in declared else visit(v) for f, v in fields.items()})
        if isinstance(node, (tuple, list)):
            return type(node)(visit(c) for c in node)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return node

    return visit(state)


def to_group(found: dict[str, torch.Tensor]) -> dict[str, Any]:
    """State hyperparameters -> param-group entries (one host read each, at construction)."""
    out: dict[str, Any] = {}
    for name, t in found.items():
        key = "lr" if name == "learning_rate" else name
        out[key] = t.item()
    if "b1" in out and "b2" in out:
        out["betas"] = (out.pop("b1"), out.pop("b2"))
    return out


def from_group(group: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """Param-group entries -> state hyperparameter values, for the names the state holds."""
    out: dict[str, Any] = {}
    for name in names:
        if name == "learning_rate":
            out[name] = group["lr"]
        elif name in ("b1", "b2") and "betas" in group:
            out[name] = group["betas"][0 if name == "b1" else 1]
        else:
            out[name] = group[name]
    return out
