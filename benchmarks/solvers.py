"""Time every funcopt solver on SPD systems and on the dual (few-residual) damped form.

    python benchmarks/solvers.py                      # CPU, n = 1k and 4k (16k: --sizes)
    python benchmarks/solvers.py --device cuda        # GPU, n = 1k, 4k, 16k
    LEGATE_CONFIG="--cpus 2 --gpus 0" python benchmarks/solvers.py --cupynumeric  # adds Legate

The SPD matrix is ``A = W + 2.2 I`` with ``W`` a Wigner matrix (spectrum about [-2, 2]), so
``cond(A)`` is about 20 at every size and building it costs O(n^2). The dual form solves
``(J^T J + lambda I) x = J^T r`` for ``J`` of shape (m, n), m = 256 residuals, through
``J J^T + lambda I``. Each figure is the median of ``--repeats`` timed runs after one warm-up
(CUDA-synchronised). The relative residual ``||A x - b|| / ||b||`` is computed in float64.
Solver/size pairs whose time, extrapolated from the previous size (n^3 for direct solvers,
n^2 for CG), would pass ``--max-seconds`` are skipped. The table is printed; with ``--out
FILE`` it also replaces this device's section of that Markdown file
(benchmarks/RESULTS_solvers.md).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

import funcopt as fo

S = fo.solvers
DIRECT = ["cholesky", "lu", "qr", "lstsq", "svd", "auto"]
ITERATIVE = ["cg", "pcg"]


def spd(n: int, dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=dtype, device=device)
    return (G + G.T) / (2 * n) ** 0.5 + 2.2 * torch.eye(n, dtype=dtype, device=device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    r = A.double() @ x.double() - b.double()
    return float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(b.double()))


def make_solver(name: str, dtype):
    if name in ITERATIVE:
        tol = 1e-6 if dtype == torch.float32 else 1e-10
        return S.CG(tol=tol, preconditioner="jacobi" if name == "pcg" else None)
    return S.get(name)


def estimate(prev: dict, name: str, n: int) -> float | None:
    if name not in prev:
        return None
    t, n0 = prev[name]
    return t * (n / n0) ** (2 if name in ITERATIVE else 3)


def run_spd(args, names, rows) -> None:
    prev: dict = {}
    for n in args.sizes:
        A = spd(n, args.dtype, args.device)
        b = torch.randn(n, dtype=args.dtype, device=args.device)
        op = S.dense(A, positive_definite=True)
        for name in names:
            est = estimate(prev, name, n)
            if est is not None and est > args.max_seconds:
                rows.append((f"SPD n={n}", name, f"skipped (est. {est:.0f} s)", "", ""))
                continue
            solver = make_solver(name, args.dtype)
            t, sol = timed(lambda op=op, b=b, solver=solver: S.solve(op, b, solver), args.device, args.repeats)
            prev[name] = (t, n)
            its = "" if sol.iterations is None else str(int(sol.iterations))
            rows.append((f"SPD n={n}", f"{name} ({sol.solver})", f"{t * 1e3:.1f}",
                         f"{residual(A, sol.x, b):.1e}", its))
            print(rows[-1], flush=True)


def run_dual(args, rows) -> None:
    m = args.residuals
    for n in args.sizes:
        g = torch.Generator(device=args.device).manual_seed(1)
        J = torch.randn(m, n, generator=g, dtype=args.dtype, device=args.device) / n ** 0.5
        r = torch.randn(m, generator=g, dtype=args.dtype, device=args.device)
        lam = 1e-2
        forms = ["dual", "primal"] if n <= args.primal_max else ["dual"]
        for form in forms:
            t, sol = timed(lambda J=J, r=r, lam=lam, form=form: S.damped_least_squares(J, r, lam, form=form), args.device, args.repeats)
            # residual of the primal system, without forming J^T J
            Ax = J.double().T @ (J.double() @ sol.x.double()) + lam * sol.x.double()
            rhs = J.double().T @ r.double()
            res = float(torch.linalg.vector_norm(Ax - rhs) / torch.linalg.vector_norm(rhs))
            rows.append((f"damped LS m={m}, n={n}", f"{form} ({sol.solver})", f"{t * 1e3:.1f}",
                         f"{res:.1e}", ""))
            print(rows[-1], flush=True)


def device_label(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write(path: Path, heading: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Linear solvers (funcopt.solvers)\n\n"
    parts = text.split("\n## ")
    kept = [parts[0].rstrip() + "\n"] + [p for p in parts[1:] if not p.startswith(heading)]
    path.write_text("\n## ".join(kept + [f"{heading}\n\n{body}"]).rstrip() + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--sizes", default=None, help="comma-separated n (default 1024,4096 on CPU, +16384 on CUDA)")
    p.add_argument("--residuals", type=int, default=256, help="m of the dual-form problems")
    p.add_argument("--primal-max", type=int, default=4096, help="largest n also timed in the primal form")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--cupynumeric", action="store_true", help="also time the cuPyNumeric solver")
    p.add_argument("--out", default=None, help="write (replace) this device's section of a Markdown file, "
                   "e.g. benchmarks/RESULTS_solvers.md")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    default = "1024,4096,16384" if args.device == "cuda" else "1024,4096"
    args.sizes = [int(s) for s in (args.sizes or default).split(",")]
    names = DIRECT + ITERATIVE + (["cupynumeric"] if args.cupynumeric else [])
    rows: list[tuple] = []
    run_spd(args, names, rows)
    run_dual(args, rows)
    head = "| problem | solver (used) | time ms | rel. residual | CG iterations |\n|---|---|---|---|---|\n"
    body = head + "\n".join("| " + " | ".join(r) + " |" for r in rows)
    cmd = f"`python benchmarks/solvers.py --device {args.device} --dtype {str(args.dtype)[6:]}`"
    heading = f"{device_label(args.device)}, {str(args.dtype)[6:]}"
    note = (f"{cmd}, torch {torch.__version__}, {datetime.date.today()}; median of {args.repeats} "
            f"runs. SPD: A = Wigner + 2.2 I (cond ~20).\n\n")
    print(f"## {heading}\n\n{note}{body}")
    if args.out:
        write(Path(args.out), heading, note + body)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
