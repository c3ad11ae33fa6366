"""The python code blocks of the guides in docs/ run, page by page, in order.

The blocks of one page share a namespace (a later block may use what an earlier one built),
and most end in ``assert`` statements that check what the text around them says. A block
whose first line is ``# requires: cuda`` runs only where CUDA is available, ``# requires:
cupynumeric`` by the cuPyNumeric tests under Legate (``.ci/cupynumeric.sh``); one whose first line is ``# requires:
torchrun`` (it needs several processes) is not run here.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).parents[1] / "docs"
GUIDES = sorted(p for p in DOCS.glob("*.md") if p.name not in {"index.md", "architecture.md"})
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_there_are_guides_with_code():
    assert len(GUIDES) >= 10
    assert sum(len(blocks(p)) for p in GUIDES) >= 25


@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    module = types.ModuleType(f"docs_{page.stem}")  # torch.compile looks the module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    env = module.__dict__
    ran = 0
    for i, code in enumerate(blocks(page)):
        first = code.splitlines()[0].strip() if code.strip() else ""
        if first == "# requires: torchrun":
            continue
        if first == "# requires: cuda" and not torch.cuda.is_available():
            continue
        if first == "# requires: cupynumeric":  # run under Legate by test_solvers_cupynumeric
            continue
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), env)
        except Exception as e:
            raise AssertionError(f"{page.name}, python block {i} failed:\n{code}") from e
        ran += 1
    if page.stem != "performance":
        assert ran > 0, f"{page.name} has no python block that runs on this machine"
