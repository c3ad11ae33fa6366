"""Many small fits at once: ``fo.least_squares(..., batched=True)`` against a loop of
``scipy.optimize.least_squares(method="lm")``.

Problem: ``B`` independent fits of ``y = a exp(-b t) + c`` (3 parameters) to ``m`` noisy
points each, every fit from the start ``(1, 1, 0)``; scipy and funcopt use the same
tolerances (scipy's defaults, 1e-8). Reported: wall time of each (after one warm-up run),
the ratio, how many fits succeeded, and how far funcopt's final cost is from scipy's
(``max |cost - cost_scipy| / cost_scipy``).

    python benchmarks/least_squares_scale.py --fits 2000 --points 30 --threads 1
    python benchmarks/least_squares_scale.py --fits 100000 --scipy-fits 2000 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import funcopt as fo


def data(fits: int, points: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 3.0, points)
    p = np.stack([rng.uniform(1, 3, fits), rng.uniform(0.5, 3, fits), rng.uniform(-1, 1, fits)], 1)
    y = p[:, :1] * np.exp(-p[:, 1:2] * t) + p[:, 2:3] + 0.01 * rng.standard_normal((fits, points))
    return t, y


def scipy_loop(t, y, exact_jac: bool, tol: float):
    from scipy.optimize import least_squares

    def jac(p):
        e = np.exp(-p[1] * t)
        return np.stack([e, -p[0] * t * e, np.ones_like(t)], 1)

    costs, ok = [], 0
    for row in y:
        res = least_squares(lambda p, row=row: p[0] * np.exp(-p[1] * t) + p[2] - row,
                            np.array([1.0, 1.0, 0.0]), jac=jac if exact_jac else "2-point",
                            method="lm", ftol=tol, xtol=tol, gtol=tol)
        costs.append(res.cost)
        ok += res.success
    return np.array(costs), ok


def funcopt_batched(t, y, tol: float, device: str = "cpu"):
    tt, yy = torch.tensor(t, device=device), torch.tensor(y, device=device)

    def residual_fn(p):
        return p[:, :1] * torch.exp(-p[:, 1:2] * tt) + p[:, 2:3] - yy

    p0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, device=device).repeat(len(y), 1)
    _, info = fo.least_squares(residual_fn, p0, batched=True,
                               tolerances=fo.Tolerances(ftol=tol, xtol=tol, gtol=tol))
    if device != "cpu":
        torch.cuda.synchronize()
    return info


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fits", type=int, default=2000)
    ap.add_argument("--points", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--device", default="cpu", help="where funcopt's batched fit runs")
    ap.add_argument("--scipy-fits", type=int,
                    help="time scipy's loop on the first K fits only and scale its time by "
                         "fits/K (scipy fits one problem after another; default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t, y = data(args.fits, args.points)
    fo_s, info = timed(lambda: funcopt_batched(t, y, args.tol, args.device), args.repeats)
    k = min(args.scipy_fits or args.fits, args.fits)
    rows = []
    for exact in (False, True):
        sp_s, (costs, ok) = timed(lambda exact=exact: scipy_loop(t, y[:k], exact, args.tol), 1)
        sp_s *= args.fits / k
        rel = np.abs(info.cost[:k].cpu().numpy() - costs) / costs
        rows.append((exact, sp_s, f"{ok}/{k}", rel.max()))
    device = torch.cuda.get_device_name() if args.device != "cpu" else platform.machine()
    print(f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.fits} fits x {args.points} points, tol {args.tol}"
          + (f"; scipy timed on {k} fits, scaled by {args.fits / k:g}" if k < args.fits else ""))
    print(f"funcopt batched: {fo_s * 1e3:.0f} ms, {int(info.success.sum())}/{args.fits} "
          f"success, steps max {int(info.steps.max())} mean {info.steps.double().mean():.1f}")
    for exact, sp_s, ok, rel in rows:
        jac = "exact J" if exact else "2-point J (default)"
        print(f"scipy lm loop, {jac}: {sp_s * 1e3:.0f} ms, {ok} success; "
              f"funcopt/scipy time {fo_s / sp_s:.3f}; max relative cost difference {rel:.1e}")


if __name__ == "__main__":
    main()
