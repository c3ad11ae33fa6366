"""A pytree's leaves as 1-D buffers and back: the one implementation behind
:func:`funcopt.ravel` (parameters stored flat), :func:`funcopt.flatten` (a transform run on
one buffer per group) and :func:`funcopt.func.ravel_params` (one vector for Jacobians).

A *group* is a list of leaf indices that share one buffer; :func:`concat` lays the group's
leaves end to end in index order and :func:`split` cuts a buffer back into those leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["group_by_dtype_device", "concat", "split"]

Tensor = torch.Tensor


def group_by_dtype_device(leaves: Sequence[Tensor]) -> list[list[int]]:
    """Leaf indices grouped by ``(dtype, device)``, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.dtype, x.device), []).append(i)
    return list(groups.values())


def concat(leaves: Sequence[Tensor], groups: Sequence[Sequence[int]], *,
           dtype: torch.dtype | None = None, copy: bool = True) -> tuple[Tensor, ...]:
    """One 1-D buffer per group: ``cat(leaf.reshape(-1) for leaf in group)``, each piece cast
    to ``dtype`` when given. With ``copy=False`` a group of one leaf is that leaf's 1-D view
    (no copy; leaves already stored flat cost nothing)."""
    def piece(i: int, view: bool) -> Tensor:
        leaf = leaves[i]
        flat = leaf if leaf.ndim == 1 and not view else leaf.reshape(-1)  # cat copies anyway
        return flat if dtype is None else flat.to(dtype)

    return tuple(piece(g[0], True) if len(g) == 1 and not copy
                 else torch.cat([piece(i, False) for i in g]) for g in groups)


def split(buffers: Sequence[Tensor], groups: Sequence[Sequence[int]],
          shapes: Sequence[torch.Size], out: list[Any],
          dtypes: Sequence[torch.dtype] | None = None) -> list[Any]:
    """Cut each buffer into its group's leaves, reshaped to ``shapes[i]`` (views of the
    buffer) and cast to ``dtypes[i]`` when given, written to ``out[i]``; returns ``out``.
    One operation per buffer and one per leaf that is not 1-D (a 1-D piece is the leaf)."""
    for g, buf in zip(groups, buffers):
        for i, part in zip(g, torch.split(buf, [shapes[i].numel() for i in g])):
            if part.shape != shapes[i]:
                part = part.reshape(shapes[i])
            out[i] = part if dtypes is None else part.to(dtypes[i])
    return out
