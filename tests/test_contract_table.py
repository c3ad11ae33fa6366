"""Every public transform against the contract, in one table.

Rows: every function of ``funcopt`` (and ``funcopt.heavyball``) that builds a
GradientTransformation. Columns: the contract (purity, structure/shape/dtype kept, state
that saves with ``weights_only=True`` and continues bit for bit, a wrong-shaped gradient is a
ValueError/TypeError), ``torch.func.vmap`` over independent problems against a loop,
``torch.compile(fullgraph=True)`` with no recompile after step 2, and, for hyperparameters
given as tensors, the derivative of a loss through unrolled updates against finite
differences. A public transform missing from the table is a failure, not a skip.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import funcopt as fo
from funcopt.testing import check_hyperparameter_grad, check_transform

DEFAULT_DTYPE = torch.float64
F64 = torch.float64


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=F64),
            "b": torch.randn(3, generator=g, dtype=F64)}


def _masked_tx():
    return fo.masked(fo.adam(0.1), {"w": True, "b": False})


# name -> a function returning the transform (on _params()) with its default-ish settings.
BUILD = {
    # aliases
    "sgd": lambda: fo.sgd(0.1, momentum=0.9), "adam": lambda: fo.adam(0.1),
    "adamw": lambda: fo.adamw(0.1), "nadam": lambda: fo.nadam(0.1),
    "amsgrad": lambda: fo.amsgrad(0.1), "adamax": lambda: fo.adamax(0.1),
    "rmsprop": lambda: fo.rmsprop(0.1), "adagrad": lambda: fo.adagrad(0.1),
    "adagrad_norm": lambda: fo.adagrad_norm(0.1), "lion": lambda: fo.lion(0.1),
    "laprop": lambda: fo.laprop(0.1), "adopt": lambda: fo.adopt(0.1),
    "schedule_free_adamw": lambda: fo.schedule_free_adamw(0.1),
    "schedule_free_sgd": lambda: fo.schedule_free_sgd(0.1),
    "schedule_free": lambda: fo.schedule_free(fo.scale_by_adam(), 0.1),
    "muon": lambda: fo.muon(), "soap": lambda: fo.soap(), "psgd_kron": lambda: fo.psgd_kron(),
    # building blocks
    "scale": lambda: fo.scale(0.5), "scale_by_schedule": lambda: fo.scale_by_schedule(
        fo.schedules.linear(1.0, 0.5, 10)),
    "scale_by_learning_rate": lambda: fo.scale_by_learning_rate(0.1),
    "scale_by_sign": fo.scale_by_sign, "scale_by_adam": fo.scale_by_adam,
    "scale_by_nadam": fo.scale_by_nadam, "scale_by_adamax": fo.scale_by_adamax,
    "scale_by_rms": fo.scale_by_rms, "scale_by_adagrad": fo.scale_by_adagrad,
    "scale_by_adagrad_norm": fo.scale_by_adagrad_norm, "scale_by_lion": fo.scale_by_lion,
    "scale_by_laprop": fo.scale_by_laprop, "scale_by_adopt": fo.scale_by_adopt,
    "scale_by_bias_corrected_rms": fo.scale_by_bias_corrected_rms,
    "scale_by_trust_region_clip": fo.scale_by_trust_region_clip,
    "scale_by_soap": fo.scale_by_soap, "scale_by_psgd_kron": fo.scale_by_psgd_kron,
    "scale_by_muon": lambda: fo.masked(fo.scale_by_muon(), {"w": True, "b": False}),
    "trace": lambda: fo.trace(0.9), "ema": lambda: fo.ema(0.9),
    "add_decayed_weights": lambda: fo.add_decayed_weights(0.1),
    "add_noise": lambda: fo.add_noise(0.1, 0.55, seed=3),
    "clip": lambda: fo.clip(0.5), "clip_by_global_norm": lambda: fo.clip_by_global_norm(1.0),
    "clip_by_block_rms": lambda: fo.clip_by_block_rms(1.0),
    "keep_params_nonnegative": fo.keep_params_nonnegative,
    "scale_by_sample_schedule": None,  # needs the step's sample count: see SPECIAL
    # combinators and wrappers
    "identity": fo.identity, "set_to_zero": fo.set_to_zero,
    "chain": lambda: fo.chain(fo.clip_by_global_norm(1.0), fo.adam(0.1)),
    "named_chain": lambda: fo.named_chain(("clip", fo.clip(1.0)), ("sgd", fo.sgd(0.1))),
    "masked": _masked_tx,
    "partition": lambda: fo.partition({"a": fo.adam(0.1), "s": fo.sgd(0.1)},
                                      {"w": "a", "b": "s"}),
    "multi_steps": lambda: fo.multi_steps(fo.adam(0.1), 2),
    "apply_if_finite": lambda: fo.apply_if_finite(fo.adam(0.1), 3),
    "conditionally_transform": lambda: fo.conditionally_transform(
        fo.adam(0.1), lambda count: count % 2 == 0),
    "inject_hyperparams": lambda: fo.inject_hyperparams(fo.adam)(learning_rate=0.1),
    "flatten": lambda: fo.flatten(fo.adam(0.1)),
    "all_reduce_mean": None,  # needs torch.distributed: see SPECIAL
    "lookahead": None,  # its params are LookaheadParams: see SPECIAL
    # needing curvature, a model, a residual function or per-sample statistics: see SPECIAL
    "kfac": None, "scale_by_kfac": None, "singd": None, "scale_by_singd": None,
    "levenberg_marquardt": None, "norm_test": None, "inner_product_test": None,
    "augmented_inner_product_test": None,
    # Adam variants, trust ratios
    "radam": lambda: fo.radam(0.1), "yogi": lambda: fo.yogi(0.1),
    "adabelief": lambda: fo.adabelief(0.1), "lamb": lambda: fo.lamb(0.1, weight_decay=0.01),
    "lars": lambda: fo.lars(0.1, weight_decay=0.01), "fromage": lambda: fo.fromage(0.1),
    "nadamw": lambda: fo.nadamw(0.1), "adamaxw": lambda: fo.adamaxw(0.1),
    "scale_by_radam": lambda: fo.scale_by_radam(threshold=2.0),
    "scale_by_yogi": fo.scale_by_yogi, "scale_by_belief": fo.scale_by_belief,
    "scale_by_trust_ratio": lambda: fo.scale_by_trust_ratio(0.1, 0.5, 1e-3),
    "scale_by_param_block_norm": fo.scale_by_param_block_norm,
    "scale_by_param_block_rms": fo.scale_by_param_block_rms,
    "normalize_by_update_norm": lambda: fo.normalize_by_update_norm(-1.0),
    # factored second moments
    "adafactor": lambda: fo.adafactor(0.1, min_dim_size_to_factor=3, momentum=0.9),
    "scale_by_factored_rms": lambda: fo.scale_by_factored_rms(min_dim_size_to_factor=3),
    "sm3": lambda: fo.sm3(0.1), "scale_by_sm3": fo.scale_by_sm3,
    "scale_by_lbfgs": lambda: fo.scale_by_lbfgs(3),
    # update needs value=, grad=, value_fn=: contract in tests/test_breadth_line_search.py
    "lbfgs": None, "scale_by_backtracking_linesearch": None, "scale_by_zoom_linesearch": None,
    # optax.contrib
    "prodigy": lambda: fo.prodigy(weight_decay=0.01), "dadapt_adamw": fo.dadapt_adamw,
    "ademamix": lambda: fo.ademamix(0.1), "scale_by_ademamix": fo.scale_by_ademamix,
    "simplified_ademamix": lambda: fo.simplified_ademamix(0.1, alpha=1.0),
    "scale_by_simplified_ademamix": fo.scale_by_simplified_ademamix,
    "sam": lambda: fo.sam(fo.sgd(0.1, 0.9), fo.chain(fo.normalize_by_update_norm(), fo.scale(0.05))),
    # more adaptive methods, SGD variants
    "adan": lambda: fo.adan(0.1, weight_decay=0.01), "scale_by_adan": fo.scale_by_adan,
    "novograd": lambda: fo.novograd(0.1, weight_decay=0.01), "scale_by_novograd": fo.scale_by_novograd,
    "adadelta": lambda: fo.adadelta(0.5, weight_decay=0.01), "scale_by_adadelta": fo.scale_by_adadelta,
    "rprop": lambda: fo.rprop(0.1), "scale_by_rprop": lambda: fo.scale_by_rprop(0.1),
    "sign_sgd": lambda: fo.sign_sgd(0.1), "signum": lambda: fo.signum(0.1),
    "noisy_sgd": lambda: fo.noisy_sgd(0.1, seed=1),
    "scale_by_optimistic_gradient": lambda: fo.scale_by_optimistic_gradient(0.5, 0.8),
    "optimistic_gradient_descent": lambda: fo.optimistic_gradient_descent(0.1),
    "optimistic_adam": lambda: fo.optimistic_adam(0.1),
    # update needs value=: contract in tests/test_breadth_sgd_adaptive.py
    "scale_by_polyak": None, "polyak_sgd": None,
    # filters and gates
    "centralize": fo.centralize, "zero_nans": fo.zero_nans,
    "adaptive_grad_clip": lambda: fo.adaptive_grad_clip(0.1),
    "apply_every": lambda: fo.apply_every(2), "freeze": lambda: fo.freeze({"w": True, "b": False}),
    "selective_transform": lambda: fo.selective_transform(
        fo.adam(0.1), freeze_mask={"w": False, "b": True}),
    # distance-based steps, ACProp
    "dog": lambda: fo.dog(weight_decay=0.01), "scale_by_dog": lambda: fo.scale_by_dog(
        ("learning_rate", 0.1)),
    "dowg": fo.dowg, "scale_by_dowg": fo.scale_by_dowg, "cocob": fo.cocob,
    "scale_by_cocob": fo.scale_by_cocob, "acprop": lambda: fo.acprop(0.1),
    "scale_by_acprop": fo.scale_by_acprop,
    # update needs value=: contract in tests/test_breadth_contrib_more.py
    "momo": None, "momo_adam": None,
    "mechanize": lambda: fo.mechanize(fo.adam(1.0)),
    # update needs obj_fn=: contract in tests/test_breadth_sophia.py
    "sophia": None, "scale_by_sophia": None, "hutchinson_estimator_diag_hessian": None,
    # torch.optim counterparts: ASGD, maximize, parameter averaging (swa_utils)
    "asgd": lambda: fo.asgd(0.1, t0=1), "maximize": fo.maximize,
    "ema_params": lambda: fo.chain(fo.sgd(0.1), fo.ema_params(0.9)),
    "swa": lambda: fo.chain(fo.sgd(0.1), fo.swa(start=1)),
    # update needs value=: contract in tests/test_breadth_plateau.py
    "reduce_on_plateau": None,
    # updates are per-example gradients (a leading batch axis): tests/test_breadth_dp.py
    "differentially_private_aggregate": None, "dpsgd": None,
}

# Rows whose checks need more than (grads, state, params), or that cannot run under a
# property, with the reason. Each still runs the contract check in its own test below.
SPECIAL = {
    "scale_by_sample_schedule": "update needs batch_size=",
    "lookahead": "params are LookaheadParams(fast, slow): tests/test_compose.py",
    "all_reduce_mean": "needs a process group: tests/test_distributed.py",
    "kfac": "needs a model and a curvature capture", "scale_by_kfac": "as kfac",
    "singd": "needs a model and a curvature capture", "scale_by_singd": "as singd",
    "levenberg_marquardt": "needs a residual function; update takes updates=None",
    "norm_test": "needs per-sample statistics", "inner_product_test": "as norm_test",
    "augmented_inner_product_test": "as norm_test",
}

# transforms that build their state with a Python-side decision that torch.compile cannot
# trace in one graph, with the reason (kept short; each is a known limit).
NO_COMPILE: dict[str, str] = {}
NO_VMAP: dict[str, str] = {}

HEAVYBALL = {
    name: getattr(fo.heavyball, name) for name in dir(fo.heavyball)
    if not name.startswith("_") and inspect.isfunction(getattr(fo.heavyball, name))
    and "foreach" in name
}


def _public_transform_builders():
    names = set()
    for name in dir(fo):
        f = getattr(fo, name)
        if (not name.startswith("_") and inspect.isfunction(f)
                and "GradientTransformation" in str(inspect.signature(f).return_annotation)):
            names.add(name)
    return names


def test_every_public_transform_is_in_the_table():
    missing = _public_transform_builders() - set(BUILD)
    assert not missing, f"public transforms missing from the contract table: {sorted(missing)}"
    gone = set(BUILD) - _public_transform_builders()
    assert not gone, f"names in the table that funcopt no longer has: {sorted(gone)}"
    assert len(HEAVYBALL) >= 10


ROWS = sorted(n for n, b in BUILD.items() if b is not None)


@pytest.mark.parametrize("name", ROWS)
def test_contract(name):
    tx = BUILD[name]()
    check_transform(tx, _params(), vmap=name not in NO_VMAP, compile=name not in NO_COMPILE)


@pytest.mark.parametrize("name", sorted(HEAVYBALL))
def test_heavyball_recipes(name):
    check_transform(HEAVYBALL[name](), _params())


# name -> (a function h -> transform, a value of h): a hyperparameter given as a 0-d tensor.
HYPER = {
    **{n: (getattr(fo, n), 0.05) for n in (
        "sgd adam adamw nadam amsgrad adamax rmsprop adagrad adagrad_norm lion laprop adopt "
        "schedule_free_adamw schedule_free_sgd").split()},
    "sgd-momentum": (lambda m: fo.sgd(0.05, momentum=m), 0.5),
    "adam-b1": (lambda b1: fo.adam(0.05, b1=b1), 0.8),
    "adamw-weight_decay": (lambda wd: fo.adamw(0.05, weight_decay=wd), 0.3),
    "scale": (fo.scale, 0.3),
    "scale_by_learning_rate": (fo.scale_by_learning_rate, 0.1),
    "trace": (lambda d: fo.chain(fo.trace(d), fo.scale(-0.1)), 0.5),
    "ema": (lambda d: fo.chain(fo.ema(d), fo.scale(-0.1)), 0.5),
    "add_decayed_weights": (lambda wd: fo.chain(fo.add_decayed_weights(wd), fo.scale(-0.1)), 0.2),
    "inject_hyperparams": (lambda lr: fo.inject_hyperparams(fo.adam)(learning_rate=lr), 0.05),
    "schedule_free": (lambda lr: fo.schedule_free(fo.scale_by_adam(), lr), 0.05),
    "muon": (lambda lr: fo.muon(lr), 0.02),
    "soap": (lambda lr: fo.soap(lr), 0.01),
    **{n: (getattr(fo, n), 0.05) for n in
       "radam yogi adabelief lamb lars fromage nadamw adamaxw adafactor sm3".split()},
    "lbfgs": (lambda lr: fo.lbfgs(lr, memory_size=3, linesearch=None), 0.05),
    **{n: (getattr(fo, n), 0.05) for n in "ademamix simplified_ademamix".split()},
    "prodigy": (fo.prodigy, 0.7), "dadapt_adamw": (fo.dadapt_adamw, 0.7),
    "sam": (lambda lr: fo.sam(fo.sgd(lr), fo.chain(fo.normalize_by_update_norm(), fo.scale(0.05))),
            0.05),
    **{n: (getattr(fo, n), 0.05) for n in (
        "adan novograd adadelta sign_sgd signum noisy_sgd optimistic_gradient_descent "
        "optimistic_adam").split()},
    **{n: (getattr(fo, n), 0.7) for n in "dog dowg cocob".split()},
    "acprop": (fo.acprop, 0.05),
    "mechanize": (lambda wd: fo.mechanize(fo.sgd(1.0), weight_decay=wd), 0.1),
    "asgd": (lambda lr: fo.asgd(lr, lambd=0.1, t0=1), 0.05),
    "maximize-adam": (lambda lr: fo.chain(fo.maximize(), fo.adam(lr)), 0.05),
}


@pytest.mark.parametrize("name", sorted(HYPER))
def test_tensor_hyperparameter_has_a_gradient(name):
    make, value = HYPER[name]
    check_hyperparameter_grad(make, value, _params())


def test_sample_schedule_contract():
    tx = fo.scale_by_sample_schedule(0.1)
    check_transform(tx, _params(), batch_size=8)
