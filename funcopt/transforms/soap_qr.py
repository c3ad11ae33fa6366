"""The QR behind SOAP's eigenbasis refresh: CholeskyQR2 on a GPU, Householder QR elsewhere and
where CholeskyQR2 is not accurate, and canonical columns where a factor is rank deficient.

Used by the refresh in :mod:`funcopt.transforms.soap`. Eagerly each call decides on the host
which matrices need more work; while tracing (``torch.compile``, ``torch.func.vmap``) every
matrix takes every step and ``torch.where`` picks, on the device.
"""

from __future__ import annotations

import torch

from funcopt.base import Tensor
from funcopt.engine import is_tracing

_CHOLESKY_QR_BATCH = 2**25  # elements per CholeskyQR2 batch (256 MB in float64)


def _uses_cholesky(mats: list[Tensor], cholesky: bool | None) -> bool:
    """``cholesky``, or by device where None: CholeskyQR2 for CUDA tensors."""
    return cholesky if cholesky is not None else len(mats) > 0 and mats[0].is_cuda


def _householder(a: Tensor) -> Tensor:
    return torch.linalg.qr(a)[0]


def _cholesky_qr2(mats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """CholeskyQR2 of each matrix (batched by shape, see ``_orthonormal``) and a 0-d bool
    tensor per matrix saying whether it is accurate. No host read."""
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(mats):
        by_shape.setdefault((a.shape, a.dtype, a.device), []).append(i)
    batches = []
    for idx in by_shape.values():
        n = max(1, _CHOLESKY_QR_BATCH // mats[idx[0]].numel())
        batches += [idx[j:j + n] for j in range(0, len(idx), n)]
    out, oks = list(mats), list(mats)
    for idx in batches:
        q = torch.stack([mats[i] for i in idx]).to(torch.float64)
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        ok = torch.ones(len(idx), dtype=torch.bool, device=q.device)
        for k in range(2):
            gram = q.mT @ q
            if k == 1:  # how far from orthonormal the first pass left it (NaN fails too)
                ok = ok & ((gram - eye).abs().amax((-2, -1)) < 0.1)
            r, info = torch.linalg.cholesky_ex(gram, upper=True)
            ok = ok & (info == 0)  # not in place: under vmap ``info`` is batched, ``ok`` not
            q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
        for i, qi, oki in zip(idx, q.to(mats[idx[0]].dtype).unbind(0), ok.unbind(0)):
            out[i], oks[i] = qi, oki
    return out, oks


def _orthonormal(mats: list[Tensor], cholesky: bool | None = None) -> list[Tensor]:
    """The ``Q`` of the QR decomposition of each square matrix, up to the signs of its columns.

    SOAP's update does not see those signs: a basis column enters the projected gradient and
    momentum with the same sign, the second moment squares it, and projecting back undoes it;
    the eigenvalue estimate and the reordering multiply it by itself.

    On a CPU (``cholesky`` None: by device) this is Householder QR, ``torch.linalg.qr``, as in
    HeavyBall. On a GPU that is slow at these sizes (4.4 ms for one 1024 x 1024 matrix on an
    H200, no faster in a batch), so there it is CholeskyQR2, made of matrix products:
    ``R = chol(A^T A)``, ``Q = A R^{-1}``, twice, in float64, matrices of one shape in
    batches of at most 256 MB of float64 input (the work takes a few times that). A matrix
    where that is not accurate (a failed Cholesky factorisation, or a first pass whose ``Q``
    is off orthonormal by 0.1 or more: a singular, very ill-conditioned or non-finite ``A``)
    gets Householder QR instead; one host read per call decides (while tracing, both run and
    ``torch.where`` picks on the device; on a CPU CholeskyQR2 is 2-2.5x slower than LAPACK's
    QR). On a nearly singular factor QR implementations differ in the trailing columns, which
    rounding sets (the refresh calls ``_canonical_orthonormal``, which fixes rank-deficient ones).
    """
    if not _uses_cholesky(mats, cholesky):
        return [_householder(a) for a in mats]
    qs, oks = _cholesky_qr2(mats)
    if is_tracing():
        return [torch.where(ok, q, _householder(a)) for a, q, ok in zip(mats, qs, oks)]
    good = torch.stack(oks).tolist() if mats else []  # the host read
    return [q if ok else _householder(a) for a, q, ok in zip(mats, qs, good)]


def _independent(a: Tensor, q: Tensor) -> Tensor:
    """Columns of ``a`` independent of those before them, given the ``Q`` of its QR:
    :math:`|R_{kk}| = |q_k^T a_k| > \\tau` (rounding leaves a few :math:`\\epsilon` of
    :math:`\\max_j \\|a_j\\|` in a dependent one, more after ill-conditioned ones)."""
    return ~((q * a).sum(0).abs() <= _tolerance(a))  # NaN stays, as NaN


def _tolerance(a: Tensor) -> Tensor:
    """:math:`\\tau = 8 \\sqrt{n}\\,\\epsilon \\max_j \\|a_j\\|`, the rank test's threshold."""
    return 8 * a.shape[-1] ** 0.5 * torch.finfo(a.dtype).eps * _max_column_norm(a)


def _max_column_norm(a: Tensor) -> Tensor:
    """``max_j ||a_j||`` without overflow: that of ``a`` over a power of two near ``max |a|``."""
    return _column_norms(a).amax()


def _column_norms(a: Tensor) -> Tensor:
    """``||a_j||`` for each column without overflow (see ``_max_column_norm``)."""
    t = a.abs().amax()
    s = torch.where(torch.isfinite(t) & (t > 0), torch.exp2(torch.floor(torch.log2(t))), 1.0)
    return s * (a / s).norm(dim=0)


def _columns(a: Tensor, order: Tensor) -> Tensor:
    """``a[:, order]``, written so that ``vmap`` batches ``order`` too."""
    return a.gather(-1, order.expand(a.shape[-2], -1))


def _first(key: Tensor) -> Tensor:
    """The column order that puts the columns where ``key`` is True first, in their order."""
    return torch.argsort((~key).to(torch.int32), stable=True)


def _negligible_last(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``a`` with its negligible columns (norm at most the rank test's :math:`\\tau`) last,
    the others in their order; that column order; which columns are negligible.

    A negligible column is dependent wherever it stands (:math:`|R_{kk}| \\le \\|a_k\\|`), but
    QR normalises its rounding into a column of ``Q`` that the columns after it are tested
    against: the refresh's ``m Q`` of a rank-one ``m`` has columns
    :math:`c_k v` with :math:`c_k` of rounding size, and :math:`q_0 = \\pm v / \\|v\\|` from
    such a first column made the dominant column after it test dependent. Full-rank matrices
    have none (the order is the identity, the QR the same bit for bit)."""
    negligible = _column_norms(a) <= _tolerance(a)
    order = _first(~negligible)
    return _columns(a, order), order, negligible


def _kept(moved: tuple[Tensor, Tensor, Tensor], q: Tensor) -> Tensor:
    """The columns the canonical ``Q`` keeps, in the original order: those of
    ``_negligible_last``'s matrix independent of the ones before them (``q`` its ``Q``),
    negligible ones not."""
    a, order, negligible = moved
    return _independent(a, q).gather(0, order.argsort()) & ~negligible


def _lifted(a: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` with each column not in ``keep`` replaced by the fixed generic one (see below),
    those moved after the kept ones (each group in its order); that column order."""
    i = torch.arange(1, a.shape[-1] + 1, dtype=torch.float64, device=a.device)
    fill = torch.cos(i[:, None] * (i[None, :] + 1)).to(a.dtype)
    order = _first(keep)
    return _columns(torch.where(keep, a, _max_column_norm(a) * fill), order), order


def _canonical_orthonormal(mats: list[Tensor], cholesky: bool | None = None) -> list[Tensor]:
    """``_orthonormal``, with the columns that rank deficiency leaves to rounding made canonical.

    Where column ``k`` of ``A`` lies in the span of those before it (a factor of rank below
    its side), QR normalises rounding error there: ``Q`` from column ``k`` on, and Adam in that
    basis, follow how products were rounded (``vmap``'s batched kernels round unlike a loop's).
    Such a matrix gets a second QR of its kept columns (``_kept``: independent, tested with
    the negligible ones moved last) in their order, then :math:`s f_k` for each other column
    ``k`` (:math:`s` the largest column norm, :math:`f_{ik} = \\cos((i+1)(k+2))` a fixed generic
    vector), and each column of that ``Q`` goes back to its column's place. So the kept
    columns of ``Q`` span those of ``A`` (``A``'s range, to the rank test's tolerance) and
    come as QR makes them without the others; column ``k`` of the others is :math:`f_k`
    orthogonalised against every kept column and the fills before it; ``Q^T A`` stays upper
    triangular to that tolerance (QR's derivative stays finite). Full-rank matrices keep the
    first QR bit for bit. While tracing all take the second QR. A column whose residual lies
    between rounding and ``_independent``'s threshold stays.

    Host reads per call, eagerly: with CholeskyQR2 (a GPU), one where every matrix is of full
    rank and CholeskyQR2 accurate on it, as many as ``_orthonormal``'s: CholeskyQR2's flags and
    the rank test are read together; two otherwise (see ``_replace_dependent``). With
    Householder QR (a CPU), one, which ``_orthonormal`` does not make.
    """
    moved = [_negligible_last(a) for a in mats]
    firsts = [m[0] for m in moved]
    if is_tracing() or not mats:
        keep = [_kept(m, q) for m, q in zip(moved, _orthonormal(firsts, cholesky))]
        lifted = [_lifted(a, k) for a, k in zip(mats, keep)]
        qs = _orthonormal([x for x, _ in lifted], cholesky)
        return [_columns(q, order.argsort()) for q, (_, order) in zip(qs, lifted)]
    if not _uses_cholesky(mats, cholesky):
        qs = [_householder(a) for a in firsts]
        return _replace_dependent(mats, moved, qs, list(range(len(mats))), cholesky=False)
    qs, oks = _cholesky_qr2(firsts)
    full = [_kept(m, q).all() for m, q in zip(moved, qs)]
    flags, n = torch.stack(oks + full).tolist(), len(mats)  # the host read
    for i in range(n):
        if not flags[i]:
            qs[i] = _householder(firsts[i])
    todo = [i for i in range(n) if not (flags[i] and flags[n + i])]
    return _replace_dependent(mats, moved, qs, todo, cholesky=True)


def _replace_dependent(mats: list[Tensor], moved: list[tuple[Tensor, Tensor, Tensor]],
                       qs: list[Tensor], todo: list[int], cholesky: bool) -> list[Tensor]:
    """Give each ``mats[i]`` (``i`` in ``todo``) that ``qs[i]``, the ``Q`` of ``moved[i]``
    (``_negligible_last``), finds rank deficient the ``Q`` of ``_lifted``, columns put back,
    in place of ``qs[i]``; returns ``qs``. One host read if ``todo`` is not empty. A full-rank
    one has no negligible columns, so ``qs[i]`` is its plain ``Q``.

    With ``cholesky`` the lifted matrices' CholeskyQR2 runs before that read, on every one in
    ``todo`` (rank deficient, or where CholeskyQR2 failed: mostly both), so its flags come in
    the same read; a matrix where it failed gets Householder QR after. Reading the rank test
    first, as with Householder QR, would cost a third read; deciding on the device, a second
    Householder QR of each matrix in ``todo``, the slow QR on a GPU.
    """
    if not todo:
        return qs
    keep = [_kept(moved[i], qs[i]) for i in todo]
    lifted = [_lifted(mats[i], k) for i, k in zip(todo, keep)]
    second, oks = _cholesky_qr2([x for x, _ in lifted]) if cholesky else ([], [])
    flags, n = torch.stack([k.all() for k in keep] + oks).tolist(), len(todo)  # the host read
    for j, i in enumerate(todo):
        if not flags[j]:
            x, order = lifted[j]
            q = second[j] if cholesky and flags[n + j] else _householder(x)
            qs[i] = _columns(q, order.argsort())
    return qs
