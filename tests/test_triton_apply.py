"""fo.adamw's Triton kernel writes params + updates beside the updates; fo.apply_updates returns
that sum only for the very, unmodified updates and parameters it was computed from.

Each test compares with torch's own add of the same leaves (the pure apply_updates without a
recorded sum) bit for bit, and checks whether the recorded sum was used (its leaves are views of
one buffer) or not (a fresh add).
"""

from __future__ import annotations

import pytest
import torch

import funcopt as fo
from funcopt import triton_kernels as tk

pytest.importorskip("triton")
import test_triton_adamw as kernel_tests  # noqa: E402

_tree = kernel_tests._tree
interpreter, launches = kernel_tests.interpreter, kernel_tests.launches  # fixtures

SHAPES = [(), (0,), (3,), (1024,), (1500,), (7, 5)]


def _step(dtype, wd=1e-2, shapes=SHAPES):
    """One eager fo.adamw step from fresh state: (params, updates)."""
    params = _tree(shapes, dtype, 0)
    tx = fo.adamw(1e-2, weight_decay=wd)
    state = tx.init(params)
    for k in range(2):  # the second step has non-zero moments
        updates, state = tx.update(_tree(shapes, dtype, 10 + k), state, params)
        if k == 0:
            params = {n: p + updates[n] for n, p in params.items()}
    return params, updates


def _plain_sum(params, updates):
    return {k: torch.add(p, updates[k]) for k, p in params.items()}


def _used_sum(new):
    """Whether the leaves of ``new`` lie in one storage (the kernel's sum; torch's adds give
    one storage per leaf)."""
    return len({x.untyped_storage().data_ptr() for x in new.values()}) == 1


def _same_bits(a, b):
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_apply_returns_kernel_sum_bit_for_bit(interpreter, dtype, wd):
    params, updates = _step(dtype, wd)
    want = _plain_sum(params, updates)
    got = fo.apply_updates(params, updates)
    assert _used_sum(got)
    _same_bits(got, want)


def test_sum_is_one_use(interpreter):
    params, updates = _step(torch.float32)
    first = fo.apply_updates(params, updates)
    second = fo.apply_updates(params, updates)
    assert _used_sum(first) and not _used_sum(second)
    _same_bits(second, first)
    assert all(first[k].data_ptr() != second[k].data_ptr() for k in first if first[k].numel())


@pytest.mark.parametrize("change", [lambda p, u: u["x3"].mul_(2), lambda p, u: p["x4"].add_(1.0)],
                         ids=["updates", "params"])
def test_updates_or_params_changed_in_place_are_added(interpreter, change):
    params, updates = _step(torch.float32)
    change(params, updates)
    want = _plain_sum(params, updates)
    got = fo.apply_updates(params, updates)
    assert not _used_sum(got)
    _same_bits(got, want)


def test_other_params_of_the_same_values_are_added(interpreter):
    params, updates = _step(torch.float32)
    other = {k: p.clone() * 3 for k, p in params.items()}
    got = fo.apply_updates(other, updates)
    assert not _used_sum(got)
    _same_bits(got, _plain_sum(other, updates))


def test_swapped_update_leaves_are_added(interpreter):
    params, updates = _step(torch.float32, shapes=[(5,), (5,)])
    swapped = {"x0": updates["x1"], "x1": updates["x0"]}
    got = fo.apply_updates(params, swapped)
    assert not _used_sum(got)
    _same_bits(got, _plain_sum(params, swapped))


def test_inplace_apply_adds_into_params(interpreter):
    params, updates = _step(torch.float32)
    want = _plain_sum(params, updates)
    same = fo.apply_updates(params, updates, inplace=True)
    assert same is params
    _same_bits(params, want)


def test_params_that_now_require_grad_keep_the_graph(interpreter):
    params, updates = _step(torch.float32)
    for p in params.values():
        p.requires_grad_(True)
    with pytest.warns(UserWarning, match="grows"):
        got = fo.apply_updates(params, updates)
    assert all(x.grad_fn is not None for x in got.values())
    loss = sum(x.sum() for x in got.values())
    loss.backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params.values())


def test_updates_changed_by_a_later_transform_are_added(interpreter):
    params = _tree(SHAPES, torch.float32, 0)
    tx = fo.chain(fo.adamw(1e-2, weight_decay=1e-2), fo.clip_by_global_norm(1e-3))
    state = tx.init(params)
    updates, state = tx.update(_tree(SHAPES, torch.float32, 10), state, params)
    assert interpreter  # the kernel ran inside the chain
    got = fo.apply_updates(params, updates)
    assert not _used_sum(got)
    _same_bits(got, _plain_sum(params, updates))


def test_without_params_no_sum_is_written(interpreter, monkeypatch):
    params = _tree(SHAPES, torch.float32, 0)
    recorded = []
    monkeypatch.setattr(tk, "register_sum", lambda *a: recorded.append(a))
    tx = fo.adamw(1e-2, weight_decay=0.0)
    updates, _ = tx.update(_tree(SHAPES, torch.float32, 10), tx.init(params))
    assert interpreter and not recorded
    got = fo.apply_updates(params, updates)
    _same_bits(got, _plain_sum(params, updates))


def test_training_loop_matches_chain_bit_for_bit_on_params(interpreter):
    """Ten steps of the README loop: the kernel path (sum taken every step) against the same
    kernel with the recorded sum refused (every apply adds), bit for bit."""
    def loop(use_sum):
        params = _tree(SHAPES, torch.float32, 0)
        tx = fo.adamw(1e-2, weight_decay=1e-2)
        state = tx.init(params)
        for k in range(10):
            updates, state = tx.update(_tree(SHAPES, torch.float32, 10 + k), state, params)
            if not use_sum:
                updates = {n: u.clone() for n, u in updates.items()}
            params = fo.apply_updates(params, updates)
            assert _used_sum(params) == use_sum
        return params

    _same_bits(loop(True), loop(False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_sum_bit_for_bit(launches, dtype):
    params = {k: v.cuda() for k, v in _tree(SHAPES + [(4096, 33)], dtype, 0).items()}
    tx = fo.adamw(1e-2, weight_decay=1e-2)
    updates, _ = tx.update({k: torch.randn_like(v) for k, v in params.items()}, tx.init(params),
                           params)
    assert launches
    want = _plain_sum(params, updates)
    got = fo.apply_updates(params, updates)
    assert _used_sum(got)
    _same_bits(got, want)
