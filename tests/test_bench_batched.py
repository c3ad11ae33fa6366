"""The batched curve fits of the main job: Levenberg-Marquardt stepped on every fit at once
ends at the costs of scipy's MINPACK LM run fit by fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import funcopt.bench as fb
import funcopt.bench.problems as bench_problems
from funcopt.bench.__main__ import main
from funcopt.bench.optimizers import OPTIMIZERS

scipy_optimize = pytest.importorskip("scipy.optimize")

FITS, STEPS = 12, 15


@pytest.fixture
def small_problem():
    """A 12-fit copy of curve-fits-batched, registered for the test and removed after it."""
    name = "test-curve-fits-batched-12"
    fb.register(name)(lambda seed, device: bench_problems.batched_decay_fits(FITS, seed, device,
                                                                           steps=STEPS))
    yield name
    del fb.PROBLEMS[name]
    bench_problems.REQUIRES.pop(name, None)


def scipy_costs(seed: int, rows) -> np.ndarray:
    """scipy.optimize.least_squares(method="lm") from (1, 1, 0) on the given fits, one by one."""
    t, y = (a.numpy() for a in bench_problems.decay_fits(FITS, seed, torch.device("cpu")))
    out = []
    for row in y[rows]:
        res = scipy_optimize.least_squares(lambda p, row=row: p[0] * np.exp(-p[1] * t) + p[2] - row,
                                           np.array([1.0, 1.0, 0.0]), method="lm")
        assert res.success
        out.append(res.cost)
    return np.array(out)


def test_batched_lm_steps_reach_scipys_cost_on_each_fit():
    problem = bench_problems.batched_decay_fits(FITS, 3, torch.device("cpu"), steps=STEPS)
    runner = OPTIMIZERS["lm"](problem)
    params, state = problem.params, runner.init(problem.params)
    for step in range(STEPS):
        params, state, loss = runner.step(params, state, problem.batches(step))
    assert params["abc"].shape == (FITS, 3)
    t, y = bench_problems.decay_fits(FITS, 3, torch.device("cpu"))
    x = params["abc"]
    ours = 0.5 * (x[:, :1] * torch.exp(-x[:, 1:2] * t) + x[:, 2:] - y).pow(2).sum(1)
    rows = [0, 4, 7, 11]
    np.testing.assert_allclose(ours[rows].numpy(), scipy_costs(3, rows), rtol=1e-7)
    assert float(loss) == pytest.approx(float(ours.mean()), rel=1e-12)


def test_the_main_job_runs_the_batched_fits_end_to_end(tmp_path, small_problem):
    out = tmp_path / "rep"
    rc = main(["--problems", small_problem, "--optimizers", "lm,adamw", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    results = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["adamw"]["status"] == "skipped"
    r = results["lm"]
    assert r["status"] == "ok" and r["steps"] == STEPS
    reference = scipy_costs(0, list(range(FITS)))
    assert r["final"]["loss"] == pytest.approx(reference.mean(), rel=1e-7)
    assert r["final"]["converged"] == FITS and r["final"]["fits"] == FITS
    assert r["steps_to_target"] is not None and r["steps_to_target"] <= STEPS
    assert f"{small_problem}, lm, seed 0: {FITS} of {FITS}" in (out / "report.md").read_text()
