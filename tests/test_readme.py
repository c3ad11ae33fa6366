"""The README's code blocks run and do what the README says."""

import re
import sys
import types
from pathlib import Path

import torch

import funcopt as fo

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)


def block(marker: str) -> str:
    """The one README code block that contains ``marker``."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


FIFTEEN, PLUGIN = block("warmup_cosine_decay"), block("fb.register")
FAST = block("fo.jit(train_step)")


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


def test_fast_path_program_trains_with_the_pure_steps_numbers():
    """The README's fast-path program runs as written (on a GPU it captures a CUDA graph) and
    gives what the pure step, run eagerly from the same start, gives."""
    torch.manual_seed(0)
    env: dict = {}
    exec(FAST, env)
    model, unravel, tx = env["model"], env["unravel"], env["tx"]
    flat0, _ = fo.ravel({k: v.detach() for k, v in model.named_parameters()})
    flat, state = flat0.clone(), tx.init(flat0)
    for _ in range(100):
        flat, state = env["train_step"](flat, state, env["x"], env["y"])
    torch.testing.assert_close(env["flat"], flat, rtol=1e-4, atol=1e-5)
    before = float(env["loss_fn"](unravel(flat0), env["x"], env["y"]))
    assert float(env["loss_fn"](unravel(env["flat"]), env["x"], env["y"])) < 0.5 * before


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
