"""The QR of SOAP's basis refresh on a GPU: Householder against batched CholeskyQR2.

1. Time per matrix of ``torch.linalg.qr`` (Householder, each cuSOLVER/MAGMA backend) and of
   funcopt's CholeskyQR2 (``funcopt.transforms.soap._orthonormal``, float64) on square
   float32 matrices, alone and in batches.
2. funcopt's eager SOAP step on the ``step_speed.py --cases gpt184`` shapes for several
   CholeskyQR2 batch budgets (``_CHOLESKY_QR_BATCH``, elements per batch), taking turns:
   mean ms per step over 6 steps (3 refreshes) and the peak memory above the state.
3. Agreement: 6 float64 SOAP steps (refresh every step) on three leaves, on the CPU and on the
   GPU with either QR; the largest parameter difference between each pair. ``w`` (300 x 200)
   has a rank-deficient 300-side factor in its first steps, ``e`` and ``s`` do not.

Usage: ``python benchmarks/soap_qr.py`` (CUDA only).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import step_speed  # noqa: E402

from funcopt.transforms import soap  # noqa: E402


def _ms(fn, repeat: int = 5) -> float:
    """Mean milliseconds per call, after one warm-up call."""
    return step_speed.timeit(fn, "cuda", repeat, warmup=1, mean=True) * 1e3


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("soap_qr.py times GPU kernels: run it on a GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| n | batch | Householder cusolver | Householder magma | CholeskyQR2 (float64) |")
    print("| --- | --- | --- | --- | --- |")
    for n, b in [(512, 1), (1024, 1), (1024, 10), (1024, 51), (2048, 1)]:
        mats = list(torch.randn(b, n, n, device="cuda").unbind(0))
        row = []
        for lib in ("cusolver", "magma"):
            torch.backends.cuda.preferred_linalg_library(lib)
            row.append(_ms(lambda mats=mats: [torch.linalg.qr(a) for a in mats]) / b)
        torch.backends.cuda.preferred_linalg_library("default")
        row.append(_ms(lambda mats=mats: soap._orthonormal(mats, cholesky=True)) / b)
        print(f"| {n} | {b} | " + " | ".join(f"{x:.2f} ms" for x in row) + " |")

    shapes = step_speed.shapes_for("gpt184", "cuda")
    step = step_speed.contenders("soap", ["funcopt-eager"])["funcopt-eager"](shapes, "cuda")
    for _ in range(3):
        step()
    budgets = [2**23, 2**25, 2**27]
    runs: dict[int, list[tuple[float, float]]] = {b: [] for b in budgets}
    default = soap._CHOLESKY_QR_BATCH
    for _ in range(3):
        for b in budgets:
            soap._CHOLESKY_QR_BATCH = b
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = _ms(step, repeat=6)
            runs[b].append((ms, (torch.cuda.max_memory_allocated() - base) / 2**20))
    soap._CHOLESKY_QR_BATCH = default
    print(f"\nSOAP on gpt184 ({len(shapes)} tensors), eager, refresh every 2 steps; default budget "
          f"{default:,} elements\n")
    print("| batch budget (float64 elements) | ms/step (3 turns) | peak MB above the state |")
    print("| --- | --- | --- |")
    for b, rs in runs.items():
        print(f"| {b:,} | {', '.join(f'{t:.1f}' for t, _ in rs)} | {max(m for _, m in rs):.0f} |")
    agreement()
    return 0


def agreement() -> None:
    import funcopt as fo

    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(shape, generator=g, dtype=torch.float64)
              for k, shape in {"w": (300, 200), "e": (5000, 64), "s": (150, 150)}.items()}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
             for _ in range(6)]

    def run(device: str) -> dict:
        tx = fo.soap(0.01, precondition_frequency=1)
        p = {k: v.to(device) for k, v in params.items()}
        state = tx.init(p)
        for gr in grads:
            u, state = tx.update({k: v.to(device) for k, v in gr.items()}, state, p)
            p = fo.apply_updates(p, u)
        return {k: v.cpu() for k, v in p.items()}

    cpu, cholesky = run("cpu"), run("cuda")
    orthonormal = soap._orthonormal
    soap._orthonormal = lambda mats, cholesky=None: orthonormal(mats, False)
    try:
        householder = run("cuda")
    finally:
        soap._orthonormal = orthonormal
    print("\nSOAP, 6 float64 steps: largest parameter difference\n")
    print("| leaf | GPU CholeskyQR2 vs GPU Householder | GPU Householder vs CPU | step size |")
    print("| --- | --- | --- | --- |")
    for k in params:
        print(f"| {k} {tuple(params[k].shape)} | {(cholesky[k] - householder[k]).abs().max():.1e} "
              f"| {(householder[k] - cpu[k]).abs().max():.1e} "
              f"| {(cpu[k] - params[k]).abs().max():.2f} |")


if __name__ == "__main__":
    sys.exit(main())
