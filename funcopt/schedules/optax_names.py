"""optax's names for funcopt's schedules (``optax.linear_schedule`` -> :func:`linear` ...), so
code ported from optax runs unchanged: each name is the same function, with the same arguments
in the same order. ``exponential_decay`` and ``join_schedules`` already carry optax's names."""

from __future__ import annotations

from funcopt.schedules.cyclic import (
    cosine_onecycle,
    piecewise_interpolate,
    sgdr,
    warmup_exponential_decay,
)
from funcopt.schedules.standard import (
    constant,
    cosine_decay,
    linear,
    linear_onecycle,
    piecewise_constant,
    polynomial,
    warmup_constant,
    warmup_cosine_decay,
)

__all__ = [
    "constant_schedule", "linear_schedule", "polynomial_schedule", "piecewise_constant_schedule",
    "cosine_decay_schedule", "warmup_cosine_decay_schedule", "warmup_constant_schedule",
    "linear_onecycle_schedule", "cosine_onecycle_schedule", "piecewise_interpolate_schedule",
    "sgdr_schedule", "warmup_exponential_decay_schedule",
]

constant_schedule = constant
linear_schedule = linear
polynomial_schedule = polynomial
piecewise_constant_schedule = piecewise_constant
cosine_decay_schedule = cosine_decay
warmup_cosine_decay_schedule = warmup_cosine_decay
warmup_constant_schedule = warmup_constant
linear_onecycle_schedule = linear_onecycle
cosine_onecycle_schedule = cosine_onecycle
piecewise_interpolate_schedule = piecewise_interpolate
sgdr_schedule = sgdr
warmup_exponential_decay_schedule = warmup_exponential_decay
