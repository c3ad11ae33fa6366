"""Suite-wide fixtures: no test module may leak global torch settings into another."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _default_dtype(request):
    """Run each test with its module's ``DEFAULT_DTYPE`` (float32 unless the module says so)
    and restore the previous default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(request.module, "DEFAULT_DTYPE", torch.float32))
    yield
    torch.set_default_dtype(old)
