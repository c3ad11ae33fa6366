"""Adversarial findings: each test states what a user does, what goes wrong on the current
code, and what a user would expect. Every test here fails today and is marked
``xfail(strict=True)`` while open, so it turns into an error (XPASS) the moment the library is fixed;
the ones fixed since run as plain tests:
then drop the mark and move the test to the guards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch

import funcopt as fo

DEFAULT_DTYPE = torch.float64
F64 = torch.float64
ROOT = Path(__file__).parents[1]


def _params(dtype=F64):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=F64).to(dtype),
            "b": torch.randn(3, generator=g, dtype=F64).to(dtype)}


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda p: torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype), params)




# ----------------------------------------------------------------------------- bad states


def _wrong_state_cases():
    p = _params()
    adam, adagrad = fo.adam(0.1), fo.adagrad(0.1)
    return {
        # transform -> a state from another transform a user could plausibly pass
        "amsgrad<-adam": (fo.amsgrad(0.1), adam.init(p)),
        "adagrad_norm<-adagrad": (fo.adagrad_norm(0.1), adagrad.init(p)),
        "apply_if_finite<-adam": (fo.apply_if_finite(fo.adam(0.1)), adam.init(p)),
        "masked<-adam": (fo.masked(fo.adam(0.1), {"w": True, "b": False}), adam.init(p)),
        "inject_hyperparams<-adam": (fo.inject_hyperparams(fo.adam)(learning_rate=0.1),
                                     adam.init(p)),
        "multi_steps<-adam": (fo.multi_steps(fo.adam(0.1), 2), adam.init(p)),
        "conditionally_transform<-adam": (fo.conditionally_transform(
            fo.adam(0.1), lambda c: c % 2 == 0), adam.init(p)),
        "partition<-adam": (fo.partition({"a": fo.adam(0.1), "s": fo.sgd(0.1)},
                                         {"w": "a", "b": "s"}), adam.init(p)),
        "muon<-adam": (fo.muon(), adam.init(p)),
        "psgd_kron<-adamw": (fo.psgd_kron(), fo.adamw(0.1).init(p)),
        "soap<-adam": (fo.soap(), adam.init(p)),
        "schedule_free_adamw<-schedule_free_sgd": (fo.schedule_free_adamw(0.1),
                                                   fo.schedule_free_sgd(0.1).init(p)),
        "scale_by_learning_rate<-adagrad": (fo.scale_by_learning_rate(0.1), adagrad.init(p)),
        "add_noise<-scale_by_adam": (fo.add_noise(0.1, 0.55, seed=0), fo.scale_by_adam().init(p)),
        "add_decayed_weights<-named_chain": (fo.add_decayed_weights(0.1), fo.named_chain(
            ("clip", fo.clip(1.0)), ("sgd", fo.sgd(0.1))).init(p)),
    }


@pytest.mark.parametrize("case", sorted(_wrong_state_cases()))
def test_a_state_from_another_transform_is_a_type_error_naming_the_transform(case):
    # e.g. fo.apply_if_finite(fo.adam(0.1)).update(g, fo.adam(0.1).init(p), p): a user who wraps
    # an optimizer after making its state gets
    # "AttributeError: 'tuple' object has no attribute 'inner_state'". engine.expect_state
    # exists for this and is used by adam & co; the combinators, amsgrad, adagrad_norm, muon,
    # psgd, soap, schedule-free, scale_by_learning_rate and add_noise skip it. Expected: one
    # TypeError naming the transform and the state class its init returns.
    tx, state = _wrong_state_cases()[case]
    p = _params()
    with pytest.raises(TypeError, match="state"):
        tx.update(_grads(p), state, p)


# ----------------------------------------------------------------------------- dtypes


DRIFT = {
    "scale_by_bias_corrected_rms": fo.scale_by_bias_corrected_rms,
    "soap": fo.soap,
    "schedule_free_adamw": lambda: fo.schedule_free_adamw(0.1),
    "multi_steps": lambda: fo.multi_steps(fo.adam(0.1), 2),
    "schedule_free_sgd": lambda: fo.schedule_free_sgd(0.1),
}


@pytest.mark.parametrize("name, grad_dtype", [
    (n, d) for d in (torch.float64, torch.float16) for n in sorted(DRIFT)
    if (n, d) != ("soap", torch.float16)])  # soap keeps its dtypes for float16 gradients
def test_gradients_in_another_dtype_keep_the_state_and_update_dtypes(name, grad_dtype):
    # float32 params, float64 (or float16) gradients, e.g. from a float64 loss or AMP:
    #   tx = fo.scale_by_bias_corrected_rms(); s = tx.init(p32); tx.update(g64, s, p32)
    # -> the new state holds float64 tensors where init made float32 (the next step under
    # torch.compile recompiles, a checkpoint of it no longer loads into tx.init(p32)), and
    # multi_steps/schedule_free return float32 updates for float64/float16 gradients. Expected:
    # one TypeError naming the leaf and both dtypes before any work, or the state keeping init's
    # dtypes and the updates the gradients' dtype (the contract check_transform states).
    p = _params(torch.float32)
    tx = DRIFT[name]()
    state0 = tx.init(p)
    g = optree.tree_map(lambda x: x.to(grad_dtype), _grads(p))
    try:
        upd, state1 = tx.update(g, state0, p)
    except (TypeError, ValueError):
        return
    for a, b in zip(optree.tree_leaves(state0), optree.tree_leaves(state1)):
        assert a.dtype == b.dtype, f"state leaf changed dtype {a.dtype} -> {b.dtype}"
    for u in optree.tree_leaves(upd):
        assert u.dtype == grad_dtype, f"update dtype {u.dtype}, gradient dtype {grad_dtype}"


# ----------------------------------------------------------------------------- empty input


def test_multi_steps_on_an_empty_tree_is_a_no_op_like_every_other_transform():
    # fo.multi_steps(fo.adam(0.1), 2).update({}, tx.init({}), {}) -> RuntimeError from a
    # _foreach op on an empty list. Every other transform of the contract table returns ({},
    # state) for {} (a model whose parameters are all frozen or masked out). Expected: ({},
    # state) with the step counted.
    tx = fo.multi_steps(fo.adam(0.1), 2)
    state = tx.init({})
    for _ in range(3):
        upd, state = tx.update({}, state, {})
        assert upd == {}


def test_batched_least_squares_of_zero_problems_is_empty_or_a_clear_error():
    # fo.least_squares(r, torch.ones(0, 1), batched=True) -> IndexError: index 0 is out of
    # bounds. A batch built by filtering can be empty. Expected: params back unchanged with
    # (0,)-shaped info tensors, or a ValueError saying the batch is empty.
    def r(a):
        return (a - 3) * torch.ones(a.shape[0], 4, dtype=a.dtype)
    try:
        a, info = fo.least_squares(r, torch.ones(0, 1, dtype=F64), batched=True)
    except ValueError as e:
        assert "batch" in str(e)
        return
    assert a.shape == (0, 1) and info.success.shape == (0,)


# ----------------------------------------------------------------------------- least squares


def test_a_zero_jacobian_at_a_maximum_of_the_cost_is_not_success():
    # fo.least_squares(lambda a: a**2 - 1, torch.tensor([0.0])) -> success=True,
    # reason "gtol: gradient orthogonal to the residuals", cost 0.5, while the minimum is cost 0
    # at a = +-1: a = 0 is the cost's maximum. The gtol test holds only because J == 0 (0/0
    # read as 0). MINPACK reports this too (info=4), but funcopt promises no success on a wrong
    # answer: with J identically zero at a point with r != 0 and no step taken, expected
    # success=False and a reason saying the Jacobian vanishes (a stationary point that may not
    # be a minimum).
    a, info = fo.least_squares(lambda a: a**2 - 1, torch.tensor([0.0], dtype=F64))
    assert not (info.success and info.cost > 0.25), (a, info.reason, info.cost)


# ----------------------------------------------------------------------------- benchmark CLI


def test_bench_threads_beyond_what_the_machine_has_is_one_line(tmp_path):
    # python -m funcopt.bench --threads 100000 ... -> "OpenBLAS blas_thread_init: RLIMIT_NPROC"
    # then SIGSEGV (exit -11), no report and no one-line error. --threads 0 is refused, a
    # typo with extra zeros is not. Expected: exit status 1 and one line "error: --threads ..."
    # (e.g. refuse values above os.cpu_count(), or clamp with a note) before any work.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "funcopt.bench", "--problems", "nist-misra1a", "--optimizers",
         "lm", "--steps", "1", "--no-progress", "--threads", "100000", "--out",
         str(tmp_path / "r")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-500:])
    assert proc.stderr.strip().startswith("error: --threads"), proc.stderr[-500:]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_flatten_names_the_users_leaf_for_a_non_float_gradient(dtype):
    # fo.flatten(fo.adamw(0.1)).update({"w": float, "b": int64}, state, params) -> TypeError
    # "scale_by_adam: leaf [0] of the updates is torch.int64": [0] is a position in flatten's
    # per-dtype buffers, not in the user's tree, so the user cannot tell which parameter is
    # wrong (masked, partition, apply_if_finite, multi_steps, inject_hyperparams all say
    # ['b']). Expected: flatten checks the leaves with engine.leaves before packing them, so
    # the message names ['b'].
    p = _params()
    grads = {"w": _grads(p)["w"], "b": torch.ones(3).to(dtype)}
    tx = fo.flatten(fo.adamw(0.1))
    with pytest.raises(TypeError, match=r"\['b'\]"):
        tx.update(grads, tx.init(p), p)
