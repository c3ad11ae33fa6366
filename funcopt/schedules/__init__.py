"""Schedules: functions ``step -> value`` for learning rates and other hyperparameters.

Every constructor here returns a :class:`Schedule`, a frozen callable ``schedule(t, dtype=None)``
with a short ``repr``; :func:`as_schedule` wraps a plain function ``step -> value`` in one. Test
"is this a schedule?" with ``isinstance(x, Schedule)``.

Steps: ``t`` is the number of updates already made (0 on the first update), a Python number or a
0-d tensor (usually the int64 step counter). A negative step counts as step 0, the schedule's
start (clamped with tensor ops, no host sync); a NaN or infinite Python step raises ValueError.

Values: with a tensor step a schedule returns a 0-d float32 tensor on the step's device, computed
with tensor ops only (no host sync; traces under ``torch.compile(fullgraph=True)`` and runs under
``torch.func`` transforms such as ``vmap``); with a Python step it returns a Python float
computed in float64. ``dtype`` (a floating torch dtype, default None) sets the dtype the formula
is computed in: ``schedule(count, dtype=torch.float64)`` gives a float64 tensor, exact for steps
past 2**24 where float32 is not. :func:`constant` returns its value as given for every step.

Arguments: values must be finite real numbers (not bools), step counts ints; out-of-range
arguments raise ValueError naming the argument and its range. A tensor argument is used as it is
and not checked (reading it would synchronise with its device).
Names and formulas follow optax's schedules (``optax.linear_schedule`` -> :func:`linear` ...).

Modules: :mod:`funcopt.schedules.base` (the :class:`Schedule` type and its checks),
:mod:`funcopt.schedules.standard` (the
constructors above) and :mod:`funcopt.schedules.one_based` (HeavyBall's functions of the 1-based step: PaLM's
``beta2``, the recipes' linear warm-ups, PSGD's and SOAP's refresh probabilities),
:mod:`funcopt.schedules.cyclic` (piecewise interpolation, cosine one-cycle, SGDR, warmup +
exponential decay, torch's CyclicLR and CosineAnnealingWarmRestarts) and
:mod:`funcopt.schedules.optax_names` (optax's ``*_schedule`` names for all of them).
"""

from funcopt.schedules.base import Schedule, as_schedule
from funcopt.schedules.cyclic import *  # noqa: F401,F403
from funcopt.schedules.optax_names import *  # noqa: F401,F403
from funcopt.schedules.standard import *  # noqa: F401,F403
from funcopt.schedules.standard import __all__ as _standard

# The constructors of cyclic.py and optax_names.py are attributes of this package; __all__
# lists the ones whose float64-formula cases are in tests/test_schedule_validation.py
# (those of cyclic.py are checked against optax and torch in tests/test_breadth_schedules.py).
__all__ = ["Schedule", "as_schedule", *_standard]
