"""Suite-wide fixtures: no test module may leak global torch settings into another.

Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) draws the same examples on
every run, so a CI result does not depend on chance; without it each run explores new
examples, which is how local runs find new failures.
"""

import os

import pytest
import torch
from hypothesis import settings

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
