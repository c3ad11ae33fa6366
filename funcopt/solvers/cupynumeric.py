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

and ask for this solver (``solver="cupynumeric"``), or ``Auto(use_cupynumeric=True,
cupynumeric_min_size=n)`` for square systems of size ``n`` or more; it is never chosen
otherwise (importing ``cupynumeric`` elsewhere in the program changes nothing). Legate partitions each array over the
processors it was given and runs the factorisations (Cholesky, LU, QR, SVD) as distributed
tasks; the arrays come back as one NumPy/DLPack buffer. Keep torch and Legate from competing
for the same GPU memory: Legate reserves ``--fbmem`` MiB per GPU at start-up.

Reference: Bauer & Garland, "Legate NumPy: accelerated and distributed array computing",
SC 2019; https://docs.nvidia.com/cupynumeric/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from funcopt.solvers.base import (
    LinearOperator,
    LinearSolver,
    Result,
    Solution,
    SolveStats,
    finite_or_zero,
    result_code,
    symmetric_within_tolerance,
)

__all__ = ["CuPyNumeric", "CuPyNumericState", "import_cupynumeric"]

_METHODS = ("auto", "cholesky", "solve", "qr", "svd")

_STAND_IN = (
    "Legate's wheels are CUDA builds that load libcuda.so.1, the NVIDIA driver's library. With "
    "an NVIDIA GPU, install its driver. On a machine without one, put a no-device stand-in "
    "libcuda.so.1 on LD_LIBRARY_PATH: a small shared library (a C file of about 20 lines, "
    "built with gcc -shared -fPIC) whose cuInit and cuDeviceGetCount return 100 "
    "(CUDA_ERROR_NO_DEVICE), which also exports cuDriverGetVersion, cuGetErrorName, "
    "cuGetErrorString, cuMemFreeHost, cuMemFree_v2, and cuGetProcAddress / cuGetProcAddress_v2 "
    "returning a valid function for every name; then run with LEGATE_CONFIG='--cpus 1 --gpus 0'")


def import_cupynumeric() -> Any:
    """Import cupynumeric, or raise an ImportError that says how to install it (missing) or
    why it did not load (no NVIDIA driver: the libcuda stand-in)."""
    try:
        import cupynumeric
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in (
            "cupynumeric", "legate")
        if missing:
            raise ImportError("the cuPyNumeric solver needs the nvidia-cupynumeric package: "
                              f"pip install funcopt[cupynumeric] ({e}). Once installed: "
                              f"{_STAND_IN}") from e
        raise ImportError(f"cupynumeric is installed but failed to load: {e}. {_STAND_IN}") from e
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


class CuPyNumericState(NamedTuple):
    """The operator, the method, the cuPyNumeric factors (None where the factorisation failed),
    the working dtype and the factorisation's result code."""

    operator: LinearOperator
    method: str
    factors: Any
    work: torch.dtype
    result: Tensor


@dataclass(frozen=True)
class CuPyNumeric(LinearSolver):
    """A dense solve with ``cupynumeric.linalg``; ``init`` factorises once, ``compute`` solves.

    Methods: "cholesky" (``cho_factor`` in ``init``, ``cho_solve``; symmetric positive
    definite), "solve" (``linalg.solve`` per right-hand side: cuPyNumeric has no LU factor
    object), "qr" (``A = QR`` in ``init``, ``x = R^{-1} Q^T b``; least squares for ``m >= n``),
    "svd" (pseudo-inverse with cutoff ``rcond * sigma_max``), or "auto" (default: cholesky for
    operators tagged positive definite, solve for other square ones, qr for rectangular
    ones). cuPyNumeric raises on a non-positive-definite or singular matrix; this solver turns
    that into the result code ``not_positive_definite`` (cholesky) or ``singular`` (solve) with
    ``value`` zeros. Half precision is solved in float32. The result has ``b``'s dtype and
    device.

    ``row_block=k`` (Levenberg-Marquardt with a dense Jacobian: ``fo.least_squares``,
    ``fo.levenberg_marquardt``): ``J`` is formed ``k`` rows at a time and never whole
    (:func:`funcopt.func.jacobian_row_blocks`), ``J^T J`` is summed in cuPyNumeric one block
    at a time (the column norms and ``J^T r`` in torch), and the damped system is
    solved there by Cholesky for every damping tried without forming ``J^T J`` again (see
    :mod:`funcopt.solvers.cupynumeric_normal`); without it (default None) the normal matrix is
    formed in torch and only the ``n x n`` solve runs in cuPyNumeric. Direct solves of an
    operator (``solve``, ``damped_least_squares``) are the same with or without it.

    Args:
        method: one of "auto", "cholesky", "solve", "qr", "svd" ("auto" or "cholesky" with
            ``row_block``).
        rcond: cutoff for "svd"; default ``max(m, n) * eps(dtype)``.
        row_block: None (default) or rows of ``J`` per block sent to cuPyNumeric, a positive
            int.
    """

    method: str = "auto"
    rcond: float | None = None
    row_block: int | None = None
    _cn: Any = field(default=None, init=False, repr=False, compare=False)  # the cupynumeric module
    name = "cupynumeric"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"CuPyNumeric: method must be one of {_METHODS}; got {self.method!r}")
        rb = self.row_block
        if rb is not None and (not isinstance(rb, int) or isinstance(rb, bool) or rb < 1):
            raise ValueError(f"CuPyNumeric: row_block={rb!r}; pass None or a positive int "
                             "(rows of J per block)")
        if rb is not None and self.method not in ("auto", "cholesky"):
            raise ValueError(f"CuPyNumeric: row_block solves the normal equations by Cholesky; "
                             f"method={self.method!r} cannot be used with it (pass 'auto')")
        object.__setattr__(self, "_cn", import_cupynumeric())

    def _method(self, op: LinearOperator) -> str:
        if self.method != "auto":
            return self.method
        if op.positive_definite:
            return "cholesky"
        return "solve" if op.square else "qr"

    def needs_symmetric(self, operator: LinearOperator) -> bool:
        return self._method(operator) == "cholesky"

    def _init(self, op: LinearOperator) -> CuPyNumericState:
        method = self._method(op)
        if method in ("cholesky", "solve") and not op.square:
            raise ValueError(f"cupynumeric {method} needs a square operator; got {op.shape}")
        if method == "qr" and op.shape[0] < op.shape[1]:
            raise ValueError("cupynumeric qr solves m >= n systems; use method 'svd'")
        A = op.as_matrix()
        sym = (symmetric_within_tolerance(op, A) if method == "cholesky"
               else torch.ones((), dtype=torch.bool, device=A.device))
        work = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
        finite = torch.isfinite(A).all()
        factors, failed = None, False
        if bool(finite & sym):  # host sync: Legate gets finite data only
            try:
                factors = self._factor(method, _to_cn(self._cn, A.to(work)))
            except np.linalg.LinAlgError:
                failed = True
        code = Result.not_positive_definite if method == "cholesky" else Result.singular
        result = result_code([(~finite, Result.non_finite),
                              (~sym, Result.not_symmetric),
                              (failed, code)], A.device)
        return CuPyNumericState(op, method, factors, work, result)

    def _factor(self, method: str, A: Any) -> Any:
        la = self._cn.linalg
        if method == "cholesky":
            return la.cho_factor(A, lower=True)
        if method == "qr":
            return la.qr(A)
        if method == "svd":
            U, s, Vh = la.svd(A, full_matrices=False)
            rcond = self.rcond if self.rcond is not None else max(A.shape) * np.finfo(A.dtype).eps
            inv = self._cn.where(s > rcond * s.max(), 1.0 / self._cn.where(s > 0, s, 1.0), 0.0)
            return U, inv, Vh
        return A

    def _compute(self, state: CuPyNumericState, b: Tensor) -> Solution:
        name = f"{self.name}-{state.method}"
        n = state.operator.shape[1]
        if state.factors is None:
            x = torch.zeros((n,) + tuple(b.shape[1:]), dtype=b.dtype, device=b.device)
            return Solution(x, state.result, SolveStats(), name)
        result = state.result
        try:
            xn = self._run(state.method, state.factors, _to_cn(self._cn, b.to(state.work)), n)
            x = _from_cn(xn, b)
        except np.linalg.LinAlgError:
            result = torch.full_like(result, int(Result.singular))
            x = torch.zeros((n,) + tuple(b.shape[1:]), dtype=b.dtype, device=b.device)
        x, result = finite_or_zero(x, result)
        return Solution(x, result, SolveStats(), name)

    def _run(self, method: str, factors: Any, b: Any, n: int) -> Any:
        la = self._cn.linalg
        if method == "cholesky":
            return la.cho_solve(factors, b)
        if method == "solve":
            return la.solve(factors, b)
        if method == "qr":
            Q, R = factors
            c = Q.T @ b
            if n == 1:  # cupynumeric 26.6's solve_triangular fails on a 1 x 1 matrix
                return c / (R[:1, :1] if c.ndim == 2 else R[0, :1])
            return la.solve_triangular(R, c, lower=False)
        U, inv, Vh = factors
        c = U.T @ b
        c = inv * c if c.ndim == 1 else inv[:, None] * c
        return Vh.T @ c
