"""The README's code blocks run and do what the README says."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import funcopt as fo

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)


def block(marker: str) -> str:
    """The one README code block that contains ``marker``."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


FIFTEEN, PLUGIN = block("warmup_cosine_decay"), block("fb.register")
FAST, GRAPH = block("fo.ravel(params)"), block("fo.cuda_graph(")


def test_fifteen_line_example_trains():
    g: dict = {}
    exec(FIFTEEN, g)
    p0 = {k: v.detach() for k, v in g["model"].named_parameters()}
    before = float(g["loss_fn"](p0, g["x"], g["y"]))
    after = float(g["loss_fn"](g["params"], g["x"], g["y"]))
    assert after < 0.2 * before


def test_own_problem_registers_and_lm_fits_it(tmp_path, monkeypatch):
    import funcopt.bench as fb
    from funcopt.bench.__main__ import main

    mod = types.ModuleType("readme_problems")
    exec(PLUGIN, mod.__dict__)
    monkeypatch.setitem(sys.modules, "readme_problems", mod)
    out = tmp_path / "rep"
    try:
        rc = main(["--plugin", "readme_problems", "--problems", "my-fit", "--optimizers", "lm",
                   "--out", str(out), "--no-progress"])
    finally:
        fb.PROBLEMS.pop("my-fit", None)
    assert rc == 0
    import json

    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["status"] == "ok" and res["final"]["loss"] < 1e-20


def test_fast_path_block_takes_a_step():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(10, 5, generator=g), "b": torch.zeros(10)}
    batch = (torch.randn(32, 5, generator=g), torch.randn(32, 10, generator=g))

    def loss_fn(p, b):
        return ((b[0] @ p["w"].T + p["b"] - b[1]) ** 2).mean()

    env = {"torch": torch, "fo": fo, "params": params, "loss_fn": loss_fn, "batch": batch}
    exec(FAST, env)
    assert float(loss_fn(env["unravel"](env["flat"]), batch)) < float(loss_fn(params, batch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_block_takes_the_same_step():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(10, 5, generator=g).cuda(), "b": torch.zeros(10, device="cuda")}
    batch = (torch.randn(32, 5, generator=g).cuda(), torch.randn(32, 10, generator=g).cuda())

    def loss_fn(p, b):
        return ((b[0] @ p["w"].T + p["b"] - b[1]) ** 2).mean()

    env = {"torch": torch, "fo": fo, "params": params, "loss_fn": loss_fn, "batch": batch}
    exec(FAST, env)
    flat, state = env["flat"].clone(), fo.tree_map(torch.clone, env["state"])
    expected, _ = env["step"](flat, state, env["grads"])  # the compiled pure step
    exec(GRAPH, env)  # captures, then takes one step
    torch.testing.assert_close(env["flat"], expected)


def test_torch_func_block_differentiates_and_vmaps():
    g: dict = {}
    exec(block("d_lr = grad(unrolled)"), g)  # asserts d loss / d lr < 0 itself
    h = 1e-3
    fd = (g["unrolled"](torch.tensor(0.1 + h)) - g["unrolled"](torch.tensor(0.1 - h))) / (2 * h)
    torch.testing.assert_close(g["d_lr"], fd, rtol=1e-2, atol=1e-4)
    for i in range(8):  # the vmapped step is each problem's own step
        tx, p = g["tx"], {"w": g["ps"]["w"][i]}
        u, _ = tx.update(torch.func.grad(g["loss"])(p), tx.init(p), p)
        torch.testing.assert_close(g["updates"]["w"][i], u["w"])


def test_batched_least_squares_block_fits_every_curve():
    g: dict = {}
    exec(block("batched=True"), g)  # asserts success and the fitted values itself
    assert g["info"].success.shape == (3,)
