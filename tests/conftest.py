"""Suite-wide fixtures: no test module may leak global torch settings into another.

Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) draws the same examples on
every run, so a CI result does not depend on chance; without it each run explores new
examples, which is how local runs find new failures.
"""

import os

# Keep JAX (the optax reference tests use it) off the GPU for the whole suite, before anything
# imports jax: by default every process that imports it takes most of the GPU's memory, so under
# `pytest -n 12` on a GPU machine the CUDA tests of the other workers fail with out-of-memory.
# A value the user set is kept.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _default_dtype(request):
    """Run each test with its module's ``DEFAULT_DTYPE`` (float32 unless the module says so)
    and restore the previous default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(request.module, "DEFAULT_DTYPE", torch.float32))
    yield
    torch.set_default_dtype(old)
