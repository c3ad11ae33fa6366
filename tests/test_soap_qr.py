"""The host reads of SOAP's QR refresh (``soap_qr``), and its eager decisions against the
traced path's: the canonical refresh reads CholeskyQR2's flags and the rank test together."""

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode

import funcopt as fo
from funcopt.transforms import soap as soap_module
from funcopt.transforms import soap_qr
from funcopt.transforms.soap_qr import _canonical_orthonormal

F64 = torch.float64


class _HostReads(TorchFunctionMode):
    """Counts the tensor methods that wait for the device (tolist, item, bool, ...)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _reads_of_a_refresh(monkeypatch, canonical, shape=(4, 3), cholesky=True):
    """Host reads of the third update of a SOAP refreshed every step, with the canonical or
    the plain QR refresh and (``cholesky``) the CholeskyQR2 that CUDA tensors take forced on
    CPU."""
    qr = soap_qr._canonical_orthonormal if canonical else soap_qr._orthonormal
    monkeypatch.setattr(soap_module, "_canonical_orthonormal",
                        functools.partial(qr, cholesky=cholesky))
    tx = fo.scale_by_soap(precondition_frequency=1)
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(*shape, generator=gen, dtype=F64)}
    gs = [{"w": torch.randn(*shape, generator=gen, dtype=F64)} for _ in range(3)]
    state = tx.init(p)
    for g in gs[:2]:
        _, state = tx.update(g, state, p)
    with _HostReads() as count:
        tx.update(gs[2], state, p)
    monkeypatch.undo()
    return count.reads


def test_soap_canonical_refresh_reads_the_host_no_more_than_the_plain_one(monkeypatch):
    """With CholeskyQR2 (CUDA's QR) and full-rank factors the canonical refresh reads
    CholeskyQR2's flags and the rank test in one host read: 3 reads in the update, as the
    plain refresh (it read 4)."""
    plain = _reads_of_a_refresh(monkeypatch, canonical=False)
    canonical = _reads_of_a_refresh(monkeypatch, canonical=True)
    assert len(canonical) <= len(plain), (canonical, plain)


@pytest.mark.parametrize("cholesky", [True, False])
def test_soap_canonical_refresh_of_a_rank_deficient_factor_reads_the_host_once_more(
        monkeypatch, cholesky):
    """A (16, 3) parameter: its 16 x 16 factor has rank 9 at the third update. With
    CholeskyQR2, which fails on it, the canonical refresh reads the host a second time (the
    rank test on the Householder Q, with the lifted matrix's CholeskyQR2 flags): one read more
    than the plain refresh (it read two more). Deciding on the device instead would cost a
    second Householder QR, slower on a GPU than the read. With Householder QR (a CPU) the
    canonical refresh makes the one read of the rank test, which the plain one does not."""
    plain = _reads_of_a_refresh(monkeypatch, False, (16, 3), cholesky)
    canonical = _reads_of_a_refresh(monkeypatch, True, (16, 3), cholesky)
    assert len(canonical) == len(plain) + 1, (canonical, plain)


def _with_condition(n, cond, gen):
    u, w = (torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0] for _ in range(2))
    return (u * torch.logspace(0, -torch.log10(torch.tensor(cond)), n, dtype=F64)) @ w.T


@pytest.mark.parametrize("cholesky", [True, False])
def test_canonical_q_picks_eagerly_what_the_traced_path_picks(monkeypatch, cholesky):
    """Every eager branch against the traced path (every matrix through both QRs, picked by
    torch.where): full rank, rank deficient (CholeskyQR2 fails), full rank but too ill
    conditioned for CholeskyQR2, zero, NaN; the same Q bit for bit."""
    gen = torch.Generator().manual_seed(3)
    low = torch.randn(6, 2, generator=gen, dtype=F64)
    nan = torch.randn(6, 6, generator=gen, dtype=F64)
    nan[2, 3] = float("nan")
    mats = [torch.randn(6, 6, generator=gen, dtype=F64), low @ low.T,
            _with_condition(6, 1e10, gen), torch.zeros(6, 6, dtype=F64), nan,
            torch.randn(6, 6, generator=gen, dtype=F64)]
    eager = _canonical_orthonormal(mats, cholesky)
    monkeypatch.setattr(soap_qr, "is_tracing", lambda: True)
    traced = _canonical_orthonormal(mats, cholesky)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    assert not torch.equal(eager[0], torch.linalg.qr(mats[0])[0]) == cholesky
