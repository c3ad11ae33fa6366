"""funcopt: pure, stateless optimizer transforms for PyTorch, built on torch.func.

Every method is a :class:`GradientTransformation` ``(init, update)`` pair over a parameter
pytree; methods compose with :func:`chain`. The public API is re-exported flat here.
"""

# Submodules reachable as attributes (fo.func, fo.solvers, ...); `x as x` marks a re-export.
from funcopt import engine as engine
from funcopt import func as func
from funcopt import heavyball as heavyball
from funcopt import schedules as schedules
from funcopt import solvers as solvers
from funcopt import tree as tree
from funcopt.aliases import *  # noqa: F401,F403
from funcopt.base import *  # noqa: F401,F403
from funcopt.batch_size_loop import *  # noqa: F401,F403
from funcopt.checkpoint import *  # noqa: F401,F403
from funcopt.compose import *  # noqa: F401,F403
from funcopt.data import nist as nist
from funcopt.distributed import *  # noqa: F401,F403
from funcopt.engine import elementwise as elementwise
from funcopt.engine import is_elementwise as is_elementwise
from funcopt.flat import *  # noqa: F401,F403
from funcopt.flat_jit import *  # noqa: F401,F403
from funcopt.func.jacobian import PerSampleResiduals as PerSampleResiduals
from funcopt.func.jacobian import per_sample_residuals as per_sample_residuals
from funcopt.least_squares import *  # noqa: F401,F403
from funcopt.least_squares import memory_path as memory_path
from funcopt.least_squares_batched import LEAST_SQUARES_REASONS as LEAST_SQUARES_REASONS
from funcopt.least_squares_batched import BatchedLeastSquaresInfo as BatchedLeastSquaresInfo
from funcopt.least_squares_parallel import least_squares_parallel as least_squares_parallel
from funcopt.lookahead import *  # noqa: F401,F403
from funcopt.optim import *  # noqa: F401,F403
from funcopt.transforms.adam_variants import *  # noqa: F401,F403
from funcopt.transforms.adaptive_batch import *  # noqa: F401,F403
from funcopt.transforms.asgd import *  # noqa: F401,F403
from funcopt.transforms.averaging import *  # noqa: F401,F403
from funcopt.transforms.clipping import *  # noqa: F401,F403
from funcopt.transforms.contrib import *  # noqa: F401,F403
from funcopt.transforms.distance import *  # noqa: F401,F403
from funcopt.transforms.dp import *  # noqa: F401,F403
from funcopt.transforms.factored import *  # noqa: F401,F403
from funcopt.transforms.filters import *  # noqa: F401,F403
from funcopt.transforms.first_order import *  # noqa: F401,F403
from funcopt.transforms.levenberg_marquardt import *  # noqa: F401,F403
from funcopt.transforms.line_search import *  # noqa: F401,F403
from funcopt.transforms.maximize import *  # noqa: F401,F403
from funcopt.transforms.muon import *  # noqa: F401,F403
from funcopt.transforms.natural_gradient.kfac import *  # noqa: F401,F403
from funcopt.transforms.natural_gradient.singd import *  # noqa: F401,F403
from funcopt.transforms.parameter_free import *  # noqa: F401,F403
from funcopt.transforms.per_coordinate import *  # noqa: F401,F403
from funcopt.transforms.per_coordinate_more import *  # noqa: F401,F403
from funcopt.transforms.plateau import *  # noqa: F401,F403
from funcopt.transforms.precision import *  # noqa: F401,F403
from funcopt.transforms.psgd import *  # noqa: F401,F403
from funcopt.transforms.schedule_free import *  # noqa: F401,F403
from funcopt.transforms.sgd_variants import *  # noqa: F401,F403
from funcopt.transforms.soap import *  # noqa: F401,F403
from funcopt.transforms.sophia import *  # noqa: F401,F403
from funcopt.transforms.trust_ratio import *  # noqa: F401,F403
from funcopt.transforms.weight_decay import *  # noqa: F401,F403
from funcopt.transforms.zoom_line_search import *  # noqa: F401,F403
from funcopt.wrappers import *  # noqa: F401,F403

__version__ = "0.1.0"


def _register_state_classes() -> None:
    """Put every NamedTuple class that funcopt defines (the states) on torch's allow-list, so
    ``torch.load(f, weights_only=True)`` reads a saved state back as it was."""
    import sys

    import torch

    classes = {
        obj for name, module in list(sys.modules.items())
        if name == "funcopt" or name.startswith("funcopt.")
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
        and obj.__module__.startswith("funcopt")
    }
    torch.serialization.add_safe_globals(sorted(classes, key=lambda c: getattr(c, "__qualname__", "")))


_register_state_classes()
