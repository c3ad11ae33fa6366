"""The breadth optimizers registered with the benchmark (``python -m funcopt.bench --list``)
build on a real problem and lower its loss in a few steps."""

from __future__ import annotations

import math

import pytest
import torch

import funcopt.bench.optimizers as fb
from funcopt.bench.problems import PROBLEMS

NAMES = ["radam", "lamb", "adafactor", "ademamix", "prodigy", "dadapt-adamw", "sam", "lbfgs"]


def test_listed_and_not_in_the_default_set():
    for name in NAMES:
        assert name in fb.OPTIMIZERS and name in fb.LEARNING_RATES
        assert name not in fb.DEFAULT_OPTIMIZERS


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_digits_logreg(name):
    problem = PROBLEMS["digits-logreg"](0, torch.device("cpu"))
    runner = fb.OPTIMIZERS[name](problem, lr=fb.LEARNING_RATES[name] * problem.lr_scale)
    params, state = problem.params, runner.init(problem.params)
    start = problem.loss_fn(params, problem.batches(0)).item()
    for t in range(20):
        params, state, loss = runner.step(params, state, problem.batches(t))
        assert math.isfinite(float(loss))
    end = problem.loss_fn(runner.eval_params(params, state), problem.batches(0)).item()
    assert end < start
