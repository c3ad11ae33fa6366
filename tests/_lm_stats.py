"""Reference wrappers of ``funcopt.transforms.lm_model``'s column statistics for the tests:
the dense step reads their checks on the host inside :func:`lm_model._linearize`; these read
them alone."""

from __future__ import annotations

import torch
from torch import Tensor

from funcopt.transforms import lm_model


def column_stats_deferred(J: Tensor, r: Tensor, rnorm: Tensor,
                          rmax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``lm_model._column_stats_unchecked`` with its checks as a 0-d bool ``ok`` (no host read)."""
    rmax = torch.linalg.vector_norm(r, float("inf")) if rmax is None else rmax
    col, cos, checks = lm_model._column_stats_unchecked(J, r, rnorm, rmax)
    if len(checks) == 1:
        return col, cos, checks[0]
    top = torch.maximum(checks[1], rmax) <= torch.finfo(J.dtype).max
    return col, cos, (checks[0] >= lm_model._lowest_sum(J.shape[0], J.dtype)) & top


def column_stats(J: Tensor, r: Tensor, rnorm: Tensor) -> tuple[Tensor, Tensor]:
    """Column norms and MINPACK's ``gnorm`` as the dense step keeps them: those of
    :func:`column_stats_deferred` where its checks hold, else of the scaled copy (raises
    ValueError when ``r`` or ``J`` is not finite)."""
    col, cos, ok = column_stats_deferred(J, r, rnorm)
    return (col, cos) if bool(ok) else lm_model._column_stats_scaled(J, r, rnorm)
