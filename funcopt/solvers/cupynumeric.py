"""The cuPyNumeric (Legate) backend: one solve spread over many GPUs, CPUs and nodes.

The operator is materialised, handed to cuPyNumeric (through DLPack for CUDA tensors, through
NumPy for CPU tensors), solved with ``cupynumeric.linalg`` and brought back to the caller's
device and dtype. cuPyNumeric is imported only when this solver is first built; install it with
``pip install funcopt[cupynumeric]`` (the ``nvidia-cupynumeric`` wheel).

Spreading a solve over N GPUs needs no code change: start the program under Legate's launcher,

.. code-block:: bash

    legate --gpus 4 train.py                       # 4 GPUs of one machine
    legate --nodes 2 --ranks-per-node 1 --gpus 8 train.py   # 16 GPUs on 2 machines (MPI/UCX)
    LEGATE_CONFIG="--cpus 1 --gpus 0" python train.py       # CPU only (no GPU)

and ask for this solver (``solver="cupynumeric"``), or let ``solver="auto"`` use it for large
systems once the program has imported ``cupynumeric``. Legate partitions each array over the
processors it was given and runs the factorisations (Cholesky, LU, QR, SVD) as distributed
tasks; the arrays come back as one NumPy/DLPack buffer. Keep torch and Legate from competing
for the same GPU memory: Legate reserves ``--fbmem`` MiB per GPU at start-up.

Reference: Bauer & Garland, "Legate NumPy: accelerated and distributed array computing",
SC 2019; https://docs.nvidia.com/cupynumeric/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from funcopt.solvers.base import LinearOperator, LinearSolver, Solution, finite_or_zero
from funcopt.solvers.dense import _require_symmetric

__all__ = ["CuPyNumeric", "import_cupynumeric"]

_METHODS = ("auto", "cholesky", "solve", "qr", "svd")


def import_cupynumeric() -> Any:
    """Import cupynumeric, or raise an ImportError that says how to install it."""
    try:
        import cupynumeric
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in (
            "cupynumeric", "legate")
        if missing:
            raise ImportError("the cuPyNumeric solver needs the nvidia-cupynumeric package: "
                              f"pip install funcopt[cupynumeric] ({e})") from e
        raise ImportError(
            f"cupynumeric is installed but failed to load: {e}. Legate is a CUDA build: on a "
            "machine without an NVIDIA driver it still needs a libcuda.so.1 on LD_LIBRARY_PATH "
            "(.ci/cupynumeric.sh builds a no-device stand-in from .ci/libcuda_stub.c) and "
            "LEGATE_CONFIG='--cpus 1 --gpus 0'") from e
    return cupynumeric


def _to_cn(cn: Any, t: Tensor) -> Any:
    if t.device.type == "cuda":
        return cn.from_dlpack(t.contiguous())
    return cn.asarray(t.detach().resolve_conj().numpy())


def _from_cn(a: Any, like: Tensor) -> Tensor:
    if like.device.type == "cuda":
        try:
            out = torch.from_dlpack(a)
        except Exception:  # an array Legate keeps in host memory
            out = torch.from_numpy(a.__array__().copy())
    else:
        out = torch.from_numpy(a.__array__().copy())
    return out.to(device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class CuPyNumeric(LinearSolver):
    """A dense solve with ``cupynumeric.linalg``.

    Methods: "cholesky" (``cho_factor``/``cho_solve``, symmetric positive definite),
    "solve" (LU, ``linalg.solve``), "qr" (``A = QR``, ``x = R^{-1} Q^T b``; least squares for
    ``m >= n``), "svd" (pseudo-inverse with cutoff ``rcond * sigma_max``), or "auto" (default:
    cholesky for operators tagged positive definite, solve for other square ones, qr for
    rectangular ones). cuPyNumeric raises on a non-positive-definite or singular matrix; this
    solver turns that into ``success`` False with ``x`` zeros. Half precision is solved in
    float32. The result has ``b``'s dtype and device.

    Args:
        method: one of "auto", "cholesky", "solve", "qr", "svd".
        rcond: cutoff for "svd"; default ``max(m, n) * eps(dtype)``.
    """

    method: str = "auto"
    rcond: float | None = None
    _cn: Any = field(default=None, init=False, repr=False, compare=False)  # the cupynumeric module
    name = "cupynumeric"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"CuPyNumeric: method must be one of {_METHODS}; got {self.method!r}")
        object.__setattr__(self, "_cn", import_cupynumeric())

    def _method(self, op: LinearOperator) -> str:
        if self.method != "auto":
            return self.method
        if op.positive_definite:
            return "cholesky"
        return "solve" if op.square else "qr"

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        cn = self._cn
        method = self._method(op)
        if method in ("cholesky", "solve") and not op.square:
            raise ValueError(f"cupynumeric {method} needs a square operator; got {op.shape}")
        A = op.as_matrix()
        if method == "cholesky":
            _require_symmetric(op, A, "cupynumeric cholesky")
        work = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
        An, bn = _to_cn(cn, A.to(work)), _to_cn(cn, b.to(work))
        ok = True
        try:
            xn = self._run(cn, method, An, bn, A.shape)
        except np.linalg.LinAlgError:
            ok, xn = False, cn.zeros((A.shape[1],) + tuple(b.shape[1:]), dtype=An.dtype)
        x = _from_cn(xn, b)
        x, success = finite_or_zero(x, torch.tensor(ok, device=b.device))
        return Solution(x, success, f"{self.name}-{method}")

    def _run(self, cn: Any, method: str, A: Any, b: Any, shape: tuple[int, ...]) -> Any:
        la = cn.linalg
        if method == "cholesky":
            return la.cho_solve(la.cho_factor(A, lower=True), b)
        if method == "solve":
            return la.solve(A, b)
        if method == "qr":
            if shape[0] < shape[1]:
                raise ValueError("cupynumeric qr solves m >= n systems; use method 'svd'")
            Q, R = la.qr(A)
            c = Q.T @ b
            if shape[1] == 1:  # cupynumeric 26.6's solve_triangular fails on a 1 x 1 matrix
                return c / (R[:1, :1] if c.ndim == 2 else R[0, :1])
            return la.solve_triangular(R, c, lower=False)
        U, s, Vh = la.svd(A, full_matrices=False)
        rcond = self.rcond if self.rcond is not None else max(shape) * np.finfo(A.dtype).eps
        inv = cn.where(s > rcond * s.max(), 1.0 / cn.where(s > 0, s, 1.0), 0.0)
        c = U.T @ b
        c = inv * c if c.ndim == 1 else inv[:, None] * c
        return Vh.T @ c
