"""torch.func utilities: Jacobians, per-sample gradients, curvature capture."""

from funcopt.func.capture import *  # noqa: F401,F403
from funcopt.func.jacobian import *  # noqa: F401,F403
from funcopt.func.per_sample import *  # noqa: F401,F403
from funcopt.func.row_blocks import *  # noqa: F401,F403
