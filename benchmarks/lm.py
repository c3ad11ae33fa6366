"""Levenberg-Marquardt side by side on the shipped NIST StRD problems.

    python benchmarks/lm.py [--device cuda] [--problems Misra1a,Thurber] [--out benchmarks/RESULTS_lm.md]

For each problem and start: funcopt.least_squares (exact Jacobian from torch.func) and
scipy.optimize.least_squares(method="lm") (MINPACK) with the same exact Jacobian and with its
finite-difference Jacobian. Reports significant digits reached (min over parameters), steps
(Jacobian evaluations) and wall time per step. torch-levenberg-marquardt and cupylma train
networks rather than fit NIST models; see examples/digits_lm.py for the network comparison.
"""

import argparse
import time

import torch

import funcopt as fo
from funcopt import nist


def run_funcopt(problem, start, device):
    fn = nist.residual_fn(problem._replace(x=problem.x.to(device), y=problem.y.to(device)))
    t = time.perf_counter()
    b, info = fo.least_squares(fn, problem.starts[start].to(device).clone())
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return nist.significant_digits(b.cpu(), problem.certified).min().item(), info.steps, dt


def run_scipy(problem, start, exact):
    from scipy.optimize import least_squares

    fn = nist.residual_fn(problem)
    res = lambda v: fn(torch.tensor(v)).numpy()
    jac = (lambda v: torch.autograd.functional.jacobian(fn, torch.tensor(v)).numpy()) if exact else "2-point"
    t = time.perf_counter()
    out = least_squares(res, problem.starts[start].numpy(), jac=jac, method="lm",
                        xtol=1e-15, ftol=1e-15, gtol=1e-15)
    dt = time.perf_counter() - t
    steps = out.njev if out.njev is not None else out.nfev
    return nist.significant_digits(torch.tensor(out.x), problem.certified).min().item(), steps, dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--problems", default=",".join(nist.available()))
    ap.add_argument("--out", default=None, help="write the table as Markdown to this file")
    args = ap.parse_args(argv)
    rows = ["| problem | start | funcopt digits | steps | ms/step | scipy-lm exact J digits | steps | "
            "ms/step | scipy-lm FD digits | nfev |", "|" + " --- |" * 10]
    solved = {"funcopt": 0, "exact": 0, "fd": 0}
    for name in args.problems.split(","):
        p = nist.load(name)
        for s in (0, 1):
            d1, n1, t1 = run_funcopt(p, s, args.device)
            d2, n2, t2 = run_scipy(p, s, True)
            d3, n3, _ = run_scipy(p, s, False)
            for k, d in zip(solved, (d1, d2, d3)):
                solved[k] += d >= 6
            rows.append(f"| {name} | {s + 1} | {d1:.1f} | {n1} | {1e3 * t1 / max(n1, 1):.2f} | {d2:.1f} | "
                        f"{n2} | {1e3 * t2 / max(n2, 1):.2f} | {d3:.1f} | {n3} |")
            print(rows[-1], flush=True)
    total = 2 * len(args.problems.split(","))
    rows.append(f"\nSolved to 6 digits (of {total} runs): funcopt {solved['funcopt']}, "
                f"scipy-lm exact J {solved['exact']}, scipy-lm FD {solved['fd']}. Device: {args.device}.")
    print(rows[-1])
    if args.out:
        with open(args.out, "w") as f:
            import datetime
            import platform

            f.write(f"# Levenberg-Marquardt on NIST StRD\n\n`python benchmarks/lm.py --out {args.out}` "
                    f"({datetime.date.today()}, {platform.processor() or platform.machine()}, "
                    f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n\n"
                    + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
