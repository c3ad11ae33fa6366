"""``maximize``: torch.optim's ``maximize=True`` flag as a transform."""

from __future__ import annotations

from funcopt.base import GradientTransformation
from funcopt.transforms.first_order import scale

__all__ = ["maximize"]


def maximize() -> GradientTransformation:
    r"""Negate the gradient, :math:`g \leftarrow -g` (``scale(-1)``), so the chain after it
    ascends the objective.

    Put it FIRST in a chain: ``chain(maximize(), adam(...))`` is
    ``torch.optim.Adam(..., maximize=True)``, which negates the gradient before anything else
    (weight decay included). Placed last it would only flip the final step's sign, which is
    not the same for adaptive methods. Reference: torch.optim's ``maximize`` argument;
    optax ``scale(-1)``.
    """
    return scale(-1.0)
