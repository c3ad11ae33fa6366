"""Run problems x optimizers and collect every number the report needs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

import funcopt as fo
from funcopt.bench.optimizers import OPTIMIZERS, Unavailable
from funcopt.bench.problems import PROBLEMS, Problem

__all__ = ["Result", "run_one"]


@dataclass
class Result:
    problem: str
    optimizer: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    steps: int = 0
    wall_s: float = 0.0
    state_mb: float = 0.0
    peak_mb: float | None = None
    final: dict[str, float] = field(default_factory=dict)
    curve_step: list[int] = field(default_factory=list)
    curve_time: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)
    curve_eval: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in fo.tree_leaves(tree) if isinstance(t, torch.Tensor))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(problem_name: str, optimizer_name: str, *, seed: int, device: torch.device,
            steps: int | None = None, evals: int = 20) -> Result:
    """Train ``problem_name`` with ``optimizer_name``; evaluation time is not counted.

    Anything that raises (building the problem, building the optimizer, a step, an evaluation)
    is reported as ``failed`` with the error, so one broken problem or method does not hide the
    others' results; :class:`Unavailable` from either builder is reported as ``skipped``.
    """
    torch.manual_seed(seed)
    res = Result(problem_name, optimizer_name, "ok")
    try:
        problem = PROBLEMS[problem_name](seed, device)
        if not isinstance(problem, Problem):
            raise TypeError(f"returned a {type(problem).__name__}, not a funcopt.bench.Problem")
    except Unavailable as e:
        return _set(res, "skipped", str(e))
    except Exception as e:
        return _set(res, "failed", f"building the problem: {type(e).__name__}: {e}")
    try:
        runner = OPTIMIZERS[optimizer_name](problem)
    except Unavailable as e:
        return _set(res, "skipped", str(e))
    except Exception as e:
        return _set(res, "failed", f"building the optimizer: {type(e).__name__}: {e}")
    try:
        _train(problem, runner, steps if steps is not None else problem.steps, evals, device, res)
    except Exception as e:  # report it, keep going
        return _set(res, "failed", f"{type(e).__name__}: {e}")
    if not all(map(_finite, res.final.values())):
        res.status, res.reason = "failed", "non-finite loss"
    return res


def _set(res: Result, status: str, reason: str) -> Result:
    res.status, res.reason = status, reason[:300]
    return res


def _train(problem, runner, n_steps: int, evals: int, device: torch.device, res: Result) -> None:
    every = max(1, n_steps // evals)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    params = problem.params
    state = runner.init(params)
    res.state_mb = _bytes(state) / 2**20
    losses: list[torch.Tensor] = []
    elapsed = 0.0

    def record(step: int) -> None:
        metrics = problem.evaluate(runner.eval_params(params, state))
        res.curve_step.append(step)
        res.curve_time.append(elapsed)
        res.curve_eval.append(metrics["loss"])
        res.final = metrics

    record(0)
    for step in range(n_steps):
        batch = problem.batches(step)
        _sync(device)
        t0 = time.perf_counter()
        params, state, loss = runner.step(params, state, batch)
        _sync(device)
        elapsed += time.perf_counter() - t0
        losses.append(loss.detach())
        if (step + 1) % every == 0 or step + 1 == n_steps:
            record(step + 1)
    res.steps, res.wall_s = n_steps, elapsed
    res.curve_loss = [float(x) for x in torch.stack(losses).cpu()] if losses else []
    if device.type == "cuda":
        res.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
