"""Load HeavyBall 0.7.2 (the reference for the ``Foreach*`` names) beside heavyball 3.x.

0.7.2 cannot be pip-installed next to 3.x under the same name, so its unpacked wheel is loaded
as the package ``heavyball_072`` from ``$FUNCOPT_HEAVYBALL_072`` or ``.cache/heavyball-0.7.2``:

    pip download heavyball==0.7.2 --no-deps -d /tmp/hb && \
        unzip -o /tmp/hb/heavyball-0.7.2-*.whl -d .cache/heavyball-0.7.2
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_CANDIDATES = [os.environ.get("FUNCOPT_HEAVYBALL_072", ""),
               str(Path(__file__).resolve().parents[1] / ".cache" / "heavyball-0.7.2"),
               "/tmp/hb072src"]


def load():
    if "heavyball_072" in sys.modules:
        return sys.modules["heavyball_072"]
    for root in filter(None, _CANDIDATES):
        init = Path(root) / "heavyball" / "__init__.py"
        if init.exists():
            spec = importlib.util.spec_from_file_location(
                "heavyball_072", init, submodule_search_locations=[str(init.parent)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["heavyball_072"] = module
            spec.loader.exec_module(module)
            return module
    pytest.skip("heavyball 0.7.2 not unpacked; see tests/_heavyball072.py for the command")
