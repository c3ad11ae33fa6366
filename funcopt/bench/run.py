"""One run: a problem trained by an optimizer at one learning rate and seed, timed honestly.

Timing protocol (:func:`run_one`):

1. set-up, not timed as training: build the problem and the optimizer, then run ``warmup``
   steps on a copy of the parameters and a fresh state (first-call costs: lazy library loading,
   kernel selection, torch.func tracing caches), and throw that copy away;
2. train from the original parameters and a new state; every step is timed on its own, with
   ``torch.cuda.synchronize`` before and after it on a GPU; evaluations are not timed.

``wall_s`` is the sum of the step times, ``time_per_step_s`` their median (robust to a busy
machine), ``setup_s`` everything before the first timed step. Memory: ``peak_mb`` is, on a GPU,
``torch.cuda.max_memory_allocated`` over the run (reset at its start); on a CPU, the process's
peak resident set size over the run (``VmHWM``, reset at its start through
``/proc/self/clear_refs`` on Linux), or where that cannot be reset, the process's peak since it
started (``resource.getrusage``); ``memory_kind`` says which.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import funcopt as fo
from funcopt.bench.optimizers import LEARNING_RATES, OPTIMIZERS, Unavailable
from funcopt.bench.problems import PROBLEMS, Problem

__all__ = ["Result", "device_name", "run_one", "WARMUP_STEPS"]

WARMUP_STEPS = 3


@dataclass
class Result:
    problem: str
    optimizer: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    seed: int = 0
    learning_rate: float | None = None
    schedule: str = ""
    batch_size: int | str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    warmup_steps: int = 0
    setup_s: float = 0.0
    wall_s: float = 0.0
    time_per_step_s: float = 0.0
    state_bytes: int = 0
    state_mb: float = 0.0
    peak_mb: float | None = None
    memory_kind: str = ""
    loss_name: str = ""
    target: float | None = None
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    final: dict[str, float] = field(default_factory=dict)
    final_val: dict[str, float] = field(default_factory=dict)
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
            steps: int | None = None, evals: int = 20, lr: float | None = None,
            warmup: int = WARMUP_STEPS) -> Result:
    """Train ``problem_name`` with ``optimizer_name`` (timing protocol: the module docstring).

    lr: the learning rate for an optimizer registered with one (default: its registered
        default times the problem's ``lr_scale``); ignored for one without.
    Anything that raises (building the problem, building the optimizer, a step, an evaluation)
    is reported as ``failed`` with the error, so one broken problem or method does not hide the
    others' results; :class:`Unavailable` from either builder is reported as ``skipped``.
    """
    t_setup = time.perf_counter()
    peak = _PeakMemory(device)
    torch.manual_seed(seed)
    res = Result(problem_name, optimizer_name, "ok", seed=seed)
    try:
        problem = PROBLEMS[problem_name](seed, device)
        if not isinstance(problem, Problem):
            raise TypeError(f"returned a {type(problem).__name__}, not a funcopt.bench.Problem")
    except Unavailable as e:
        return _set(res, "skipped", str(e))
    except Exception as e:
        return _set(res, "failed", f"building the problem: {type(e).__name__}: {e}")
    res.loss_name, res.target, res.batch_size = problem.loss_name, problem.target, problem.batch_size
    try:
        runner = _build(optimizer_name, problem, lr, res)
    except Unavailable as e:
        return _set(res, "skipped", str(e))
    except Exception as e:
        return _set(res, "failed", f"building the optimizer: {type(e).__name__}: {e}")
    try:
        n = steps if steps is not None else problem.steps
        _warm_up(problem, runner, min(warmup, n), device)
        res.warmup_steps = min(warmup, n)
        res.setup_s = time.perf_counter() - t_setup
        params, state = _train(problem, runner, n, evals, device, res)
        res.final = problem.evaluate(runner.eval_params(params, state))
    except Exception as e:  # report it, keep going
        return _set(res, "failed", f"{type(e).__name__}: {e}")
    res.peak_mb, res.memory_kind = peak.read()
    _time_to_target(res)
    if not all(map(_finite, [*res.final.values(), *res.final_val.values()])):
        res.status, res.reason = "failed", "non-finite loss"
    return res


def _build(name: str, problem: Problem, lr: float | None, res: Result):
    build = OPTIMIZERS[name]
    if name in LEARNING_RATES:
        res.learning_rate = float(lr) if lr is not None else LEARNING_RATES[name] * problem.lr_scale
        runner = build(problem, lr=res.learning_rate)
    else:
        runner = build(problem)
    settings = dict(getattr(runner, "settings", {}) or {})
    res.schedule = str(settings.pop("schedule", "constant" if name in LEARNING_RATES else ""))
    res.batch_size = settings.pop("batch_size", res.batch_size)
    res.settings = settings
    return runner


def _set(res: Result, status: str, reason: str) -> Result:
    res.status, res.reason = status, reason[:300]
    return res


def _copy(tree):
    return fo.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def _warm_up(problem: Problem, runner, n: int, device: torch.device) -> None:
    """``n`` steps on a copy of the parameters and a state of their own, then thrown away."""
    params = _copy(problem.params)
    state = runner.init(params)
    for step in range(n):
        params, state, _ = runner.step(params, state, problem.batches(step))
    (problem.validate or problem.evaluate)(runner.eval_params(params, state))
    _sync(device)


def _train(problem: Problem, runner, n_steps: int, evals: int, device: torch.device,
           res: Result) -> tuple[Any, Any]:
    """Train from ``problem.params``; fill ``res``'s timings and curves; return the final
    parameters and state."""
    every = max(1, n_steps // evals)
    validate = problem.validate or problem.evaluate
    params = problem.params
    state = runner.init(params)
    res.state_bytes = _bytes(state)
    res.state_mb = res.state_bytes / 2**20
    losses: list[torch.Tensor] = []
    times: list[float] = []

    def record(step: int) -> None:
        res.final_val = validate(runner.eval_params(params, state))
        res.curve_step.append(step)
        res.curve_time.append(sum(times))
        res.curve_eval.append(res.final_val["loss"])

    record(0)
    for step in range(n_steps):
        batch = problem.batches(step)
        _sync(device)
        t0 = time.perf_counter()
        params, state, loss = runner.step(params, state, batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
        if (step + 1) % every == 0 or step + 1 == n_steps:
            record(step + 1)
    res.steps, res.wall_s = n_steps, sum(times)
    res.time_per_step_s = sorted(times)[len(times) // 2] if times else 0.0
    res.curve_loss = [float(x) for x in torch.stack(losses).cpu()] if losses else []
    return params, state


def _time_to_target(res: Result) -> None:
    """The first evaluation at or below the target: its step and the training time to it."""
    if res.target is None:
        return
    for step, t, loss in zip(res.curve_step, res.curve_time, res.curve_eval):
        if loss <= res.target:
            res.steps_to_target, res.time_to_target_s = step, t
            return


def device_name(device: torch.device) -> str:
    """The model name of ``device``: the GPU's for CUDA (``torch.cuda.get_device_name``), the
    CPU's otherwise (``model name`` in Linux's ``/proc/cpuinfo``, else ``platform.processor()``
    or ``platform.machine()``). Reports from different device models are never merged."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    except OSError:
        m = None
    return m.group(1).strip() if m else platform.processor() or platform.machine()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


class _PeakMemory:
    """Peak memory over a run: CUDA's allocator peak, or the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.resettable = _reset_rss_peak()

    def read(self) -> tuple[float | None, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, \
                "torch.cuda.max_memory_allocated over the run"
        if self.resettable:
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None:
                return hwm / 1024, "process peak RSS over the run (VmHWM, reset at its start)"
        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = raw / 1024 if sys.platform == "darwin" else float(raw)  # bytes on macOS, KiB on Linux
        return kb / 1024, "process peak RSS since the process started (getrusage; no reset here)"


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _proc_status_kb(key: str) -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None
