"""Where the time of ``fo.least_squares(..., batched=True)`` goes, phase by phase.

The problem of ``least_squares_scale.py`` (``B`` fits of ``y = a exp(-b t) + c``). The
driver's pieces are wrapped with timers (on CUDA each phase is bracketed by
``torch.cuda.synchronize()``, so the split is exact but the total is a little above an
unwrapped run's, which is printed too):

* jacobian: residuals and Jacobian at the current points (forward-mode ``jvp``),
* model: column scaling, ``J^T J`` and the spectral model, of which eigh: the
  eigendecomposition,
* mu search: the trust-region damping (Newton iteration),
* trial: residual norms at the trial points,
* acceptance: step, gain ratio, accept/reject and radius update,
* bookkeeping: stopping tests, state selection, the loop.

Host syncs (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero`` and copies to the host) are
counted on a separate run, per pass (one attempt per problem) and per phase.

    PYTHONPATH=. python benchmarks/lsq_profile.py --device cpu --fits 2000 --threads 1
    PYTHONPATH=. python benchmarks/lsq_profile.py --device cuda --fits 100000
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import funcopt as fo
import funcopt.least_squares_batched as lsb
from funcopt.transforms import lm_batched

sys.path.insert(0, str(Path(__file__).resolve().parent))
from least_squares_scale import data  # noqa: E402  (the benchmark's problem)

_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default",
             "aten.is_nonzero.default"}


class _Phases:
    """Inclusive timers on a stack; each phase's own time excludes the phases nested in it."""

    def __init__(self, cuda: bool):
        self.cuda, self.stack, self.own = cuda, ["bookkeeping"], collections.Counter()
        self.calls = collections.Counter()

    def wrap(self, owner, name: str, label: str, nested_ok: bool = True) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not nested_ok and self.stack[-1] != "bookkeeping" and self.stack[-1] != "acceptance":
                return fn(*args, **kwargs)  # e.g. residuals evaluated inside the Jacobian
            if self.cuda:
                torch.cuda.synchronize()
            self.stack.append(label)
            self.calls[label] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.stack.pop()
                self.own[label] += dt
                self.own[self.stack[-1]] -= dt

        setattr(owner, name, timed)


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device, by the phase they run in."""

    def __init__(self, phases: _Phases):
        super().__init__()
        self.phases, self.count = phases, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        to_host = (name.startswith("aten._to_copy") and kwargs and kwargs.get("device")
                   and torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu")
        if name in _SYNC_OPS or to_host:
            self.count[self.phases.stack[-1]] += 1
        return func(*args, **(kwargs or {}))


def _fit(t, y, device: str):
    tt, yy = torch.tensor(t, device=device), torch.tensor(y, device=device)

    def residual_fn(p):
        return p[:, :1] * torch.exp(-p[:, 1:2] * tt) + p[:, 2:3] - yy

    p0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, device=device).repeat(len(y), 1)
    tol = fo.Tolerances(ftol=1e-8, xtol=1e-8, gtol=1e-8)  # as least_squares_scale.py
    _, info = fo.least_squares(residual_fn, p0, batched=True, tolerances=tol)
    if device != "cpu":
        torch.cuda.synchronize()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fits", type=int, default=2000)
    ap.add_argument("--points", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t, y = data(args.fits, args.points)
    _fit(t, y, args.device)  # warm-up
    plain = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        info = _fit(t, y, args.device)
        plain.append(time.perf_counter() - t0)
    ph = _Phases(args.device != "cpu")
    ph.wrap(lsb, "batched_jacobian", "jacobian")
    ph.wrap(lm_batched, "local_model", "model")
    ph.wrap(lm_batched, "_batched_eigh", "eigh")
    ph.wrap(lm_batched, "_trust_region_mu", "mu search")
    ph.wrap(lm_batched, "attempt", "acceptance")
    ph.wrap(lm_batched, "batched_norm", "trial", nested_ok=False)
    runs = []
    for _ in range(args.repeats):
        ph.own.clear()
        ph.calls.clear()
        t0 = time.perf_counter()
        _fit(t, y, args.device)
        total = time.perf_counter() - t0
        ph.own["bookkeeping"] += total
        runs.append((total, dict(ph.own), dict(ph.calls)))
    total, own, calls = min(runs, key=lambda r: r[0])
    passes = calls.get("acceptance", 0)
    counter = _SyncCounter(ph)
    tolist = torch.Tensor.tolist

    def counted_tolist(self):  # a CPU tensor's tolist dispatches no op: count it here
        if self.device.type == "cpu":
            counter.count[ph.stack[-1]] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    try:
        with counter:
            _fit(t, y, args.device)
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    syncs = counter.count
    dev = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"{dev}, torch {torch.__version__}, {args.threads} thread(s), {args.fits} fits x "
          f"{args.points} points: {min(plain) * 1e3:.1f} ms unwrapped, {total * 1e3:.1f} ms "
          f"with phase timers; steps max {int(info.steps.max())} mean "
          f"{info.steps.double().mean():.2f}; {passes} passes, "
          f"{calls.get('jacobian', 0)} Jacobians, {calls.get('eigh', 0)} eigh calls")
    print(f"{'phase':<12} {'ms':>9} {'share':>6} {'ms/pass':>8} {'host syncs':>10}")
    for k in ("jacobian", "model", "eigh", "mu search", "trial", "acceptance", "bookkeeping"):
        ms = own.get(k, 0.0) * 1e3
        print(f"{k:<12} {ms:9.1f} {ms / (total * 1e3):6.1%} {ms / max(passes, 1):8.2f} "
              f"{syncs.get(k, 0):10d}")
    n = sum(syncs.values())
    print(f"host syncs: {n} in all, {n / max(passes, 1):.2f} per pass ('model' includes eigh's "
          "own time only outside eigh's row)")


if __name__ == "__main__":
    main()
