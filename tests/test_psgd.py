"""PSGD Kron against HeavyBall 3.2.1's ``PSGDKron``, plus the contract and its errors.

Probes: HeavyBall draws each probe with ``torch.randn_like`` from the global generator, one
draw per bucket of same-shape leaves, on every preconditioner-update step. funcopt draws the
same way from its own generator (state field ``rng``) seeded with ``seed``; seeding the global
generator with the same number before HeavyBall's steps makes both see identical probes. The
leaves below repeat some shapes so that buckets of several leaves are exercised.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.utils._python_dispatch import TorchDispatchMode

import funcopt as fo
from funcopt.testing import check_transform, pytrees

heavyball = pytest.importorskip("heavyball")
heavyball.utils.compile_mode = None

SHAPES = [(6, 4), (5,), (3, 1, 4), (6, 4), (1, 7), (1,), (2, 3, 2), (5,), (1,)]
STEPS = 50


def _problem(dtype, steps=STEPS):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
             for _ in range(steps)]
    return init, grads


def _heavyball_run(init, grads, seed, hb_kwargs, dtype_name):
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = heavyball.PSGDKron(ps, q_dtype=dtype_name, storage_dtype=dtype_name, **hb_kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its torch.triu calls crawl on small inputs with busy threads
    try:
        torch.manual_seed(seed)
        out = []
        for g in grads:
            for p, gg in zip(ps, g):
                p.grad = gg.clone()
            opt.step()
            out.append([p.detach().clone() for p in ps])
    finally:
        torch.set_num_threads(threads)
    return out


def _funcopt_run(init, grads, tx):
    params, state, out = [x.clone() for x in init], None, []
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = fo.apply_updates(params, u)
        out.append(params)
    return out, state


CASES = {
    "defaults": ({}, {}),
    "weight_decay_warmup": ({"weight_decay": 0.1, "warmup_steps": 5},
                            {"weight_decay": 0.1, "warmup_steps": 5}),
    "small_triangular": ({"max_size_triangular": 4},
                         {"options": fo.PsgdKronOptions(max_size_triangular=4)}),
    "one_diag": ({"memory_save_mode": "one_diag"},
                 {"options": fo.PsgdKronOptions(memory_save_mode="one_diag")}),
    "one_triu": ({"memory_save_mode": "one_triu"},
                 {"options": fo.PsgdKronOptions(memory_save_mode="one_triu")}),
    "all_diag_min_ndim": ({"memory_save_mode": "all_diag", "min_ndim_triangular": 3},
                          {"options": fo.PsgdKronOptions(memory_save_mode="all_diag",
                                                         min_ndim_triangular=3)}),
    "grad_into_precond": ({"momentum_into_precond_update": False, "betas": (0.8, 0.999)},
                          {"momentum_into_precond_update": False, "b1": 0.8}),
    "half_probability": ({"preconditioner_update_probability": 0.4},
                         {"preconditioner_update_probability": 0.4}),
    "fixed_init_scale": ({"precond_init_scale": 0.5, "precond_lr": 0.3},
                         {"options": fo.PsgdKronOptions(precond_init_scale=0.5),
                          "precond_lr": 0.3}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_heavyball_float64(case):
    hb_kwargs, fo_kwargs = CASES[case]
    init, grads = _problem(torch.float64)
    ref = _heavyball_run(init, grads, 7, {"lr": 0.01, **hb_kwargs}, "float64")
    got, _ = _funcopt_run(init, grads, fo.psgd_kron(0.01, seed=7, **fo_kwargs))
    for step, (a, b) in enumerate(zip(got, ref)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7, msg=f"{case}, step {step}")


def test_matches_heavyball_float32_defaults():
    init, grads = _problem(torch.float32, steps=20)
    ref = _heavyball_run(init, grads, 11, {"lr": 0.003}, "float32")
    got, _ = _funcopt_run(init, grads, fo.psgd_kron(0.003, seed=11))
    for a, b in zip(got[-1], ref[-1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_probability_schedule_matches_heavyball():
    ref = heavyball.utils.precond_update_prob_schedule()
    ours = fo.precond_update_prob_schedule()
    for t in (1, 500, 1000, 1001, 1500, 3000, 10_000):
        assert float(ours(torch.tensor(t))) == pytest.approx(ref(t), rel=1e-12)


def test_update_steps_follow_accumulated_probability():
    """With p = 0.25 the factors change on steps 4, 8, ... only (after the first-step scale)."""
    tx = fo.scale_by_psgd_kron(preconditioner_update_probability=0.25)
    params = [torch.randn(3, 3, dtype=torch.float64)]
    state = tx.init(params)
    changed = []
    for i in range(8):
        _, new = tx.update([torch.randn(3, 3, dtype=torch.float64)], state, params)
        if i > 0:
            changed.append(not torch.equal(new.qs[0][0], state.qs[0][0]))
        state = new
    assert changed == [False, False, True, False, False, False, True]


class _HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (``.item()``, ``bool()``, indexing with a 0-d
    tensor): on a GPU each one waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_fit_reads_no_device_values_on_the_host():
    """Beyond the one ``.tolist()`` that decides whether to fit (not a dispatched op), a step
    with triangular, diagonal and 0-d factors in buckets of one and two leaves reads nothing."""
    tx = fo.scale_by_psgd_kron()
    params = [torch.randn(5, 4), torch.randn(4), torch.randn(5, 4), torch.randn(())]
    state = tx.init(params)
    with _HostReads() as reads:
        for _ in range(3):
            _, state = tx.update(params, state, params)
    assert reads.count == 0


def test_bucketing_keeps_each_leafs_state_dtype():
    """Leaves of one gradient shape and dtype but different parameter dtypes are not stacked
    together (stacking would promote the float32 leaf's momentum and factors to float64)."""
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2)]
    tx = fo.scale_by_psgd_kron()
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"leaf \[0\].*float32.*float64"):  # not in params' dtype
        tx.update([torch.randn(3, 2), torch.randn(3, 2)], state, params)
    grads = [torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2)]
    for _ in range(2):
        _, state = tx.update(grads, state, params)
    assert [m.dtype for m in state.mu] == [torch.float64, torch.float32]
    assert [q[0].dtype for q in state.qs] == [torch.float64, torch.float32]


def _clip_formula(x):
    x = x / 1.5
    return ((torch.sign(x) * torch.log1p(x.abs()) * 0.1 + torch.tanh(x) * 0.9) * 1.5).clamp(-2, 2)


def test_trust_region_clip_against_formula():
    u = torch.linspace(-300, 300, 201, dtype=torch.float64)  # reaches the clamp at +-2
    leaves = [u, u[::2].float(), u[1::2].bfloat16()]
    before = [x.clone() for x in leaves]
    out, _ = fo.scale_by_trust_region_clip().update(leaves, ())
    assert all(torch.equal(x, b) for x, b in zip(leaves, before))  # the input is not touched
    assert out[0].abs().max() == 2.0 and (out[0].abs() < 2.0).any()
    tol = {torch.float64: {}, torch.float32: {"rtol": 1e-6, "atol": 1e-6},
           torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}
    for o, x in zip(out, leaves):
        assert o.dtype == x.dtype
        torch.testing.assert_close(o.double(), _clip_formula(x.double()), **tol[o.dtype])


def test_trust_region_clip_derivatives_match_finite_differences():
    """Through autograd and torch.func (which take the out-of-place path) the clip's
    derivative is that of the formula: checked against central differences in float64 (not at
    0, where autograd takes abs'(0) = 0 for sign(x) log1p|x|, whose derivative there is 1)."""
    x = torch.tensor([-40.0, -3.0, -0.7, -1e-3, 0.2, 1.1, 2.5, 9.0], dtype=torch.float64)
    clip = lambda z: fo.scale_by_trust_region_clip().update([z], ())[0][0]  # noqa: E731
    h = 1e-6
    fd = torch.stack([(clip(x + h * e) - clip(x - h * e)).sum() / (2 * h)
                      for e in torch.eye(len(x), dtype=torch.float64)])
    by_func = torch.func.grad(lambda z: clip(z).sum())(x)
    z = x.clone().requires_grad_(True)
    clip(z).sum().backward()
    torch.testing.assert_close(by_func, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(z.grad, fd, rtol=1e-6, atol=1e-8)


def test_fixed_seed_is_reproducible_and_seed_matters():
    init, grads = _problem(torch.float64, steps=3)
    a, _ = _funcopt_run(init, grads, fo.psgd_kron(0.01, seed=1))
    b, _ = _funcopt_run(init, grads, fo.psgd_kron(0.01, seed=1))
    c, _ = _funcopt_run(init, grads, fo.psgd_kron(0.01, seed=2))
    assert all(torch.equal(x, y) for x, y in zip(a[-1], b[-1]))
    assert not all(torch.equal(x, y) for x, y in zip(a[-1], c[-1]))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=pytrees(max_leaves=3))
def test_contract(params):
    check_transform(fo.psgd_kron(0.01, weight_decay=0.01), params)


def test_contract_bfloat16_and_memory_modes():
    params = {"w": torch.randn(4, 3, dtype=torch.bfloat16), "b": torch.randn(3), "s": torch.randn(())}
    check_transform(fo.psgd_kron(0.01), params)
    check_transform(fo.psgd_kron(0.01, options=fo.PsgdKronOptions(
        memory_save_mode="smart_one_diag")), params)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="memory_save_mode"):
        fo.PsgdKronOptions(memory_save_mode="half")
    with pytest.raises(ValueError, match="b1"):
        fo.psgd_kron(b1=1.5)
    tx = fo.psgd_kron()
    state = tx.init([torch.ones(2)])
    with pytest.raises(ValueError, match="leaves|structure"):
        tx.update([torch.ones(2), torch.ones(3)], state, [torch.ones(2), torch.ones(3)])


@pytest.mark.parametrize("field, value, error", [
    ("max_size_triangular", 0, ValueError), ("max_size_triangular", 2.5, TypeError),
    ("min_ndim_triangular", -1, ValueError), ("memory_save_mode", "half", ValueError),
    ("precond_init_scale", 0.0, ValueError), ("precond_init_scale_scale", -1.0, ValueError),
    ("precond_init_scale_power", float("nan"), ValueError),
    ("lower_bound_beta", 1.5, ValueError), ("dampening", -1e-9, ValueError),
    ("precond_update_power_iterations", 0, ValueError), ("q_dtype", torch.int32, TypeError),
])
def test_options_reject_bad_values_naming_the_field(field, value, error):
    with pytest.raises(error, match=f"PsgdKronOptions.{field}"):
        fo.PsgdKronOptions(**{field: value})


def test_options_are_frozen_and_typed():
    opts = fo.PsgdKronOptions(dampening=1e-6)
    with pytest.raises(AttributeError):
        opts.dampening = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="options"):
        fo.scale_by_psgd_kron(options={"dampening": 1e-6})
    with pytest.raises(TypeError):
        fo.psgd_kron(0.01, memory_save_mode="one_diag")  # a field of the options, not a keyword


def test_default_options_equal_no_options():
    init, grads = _problem(torch.float64, steps=5)
    a, _ = _funcopt_run(init, grads, fo.psgd_kron(0.01, seed=3))
    b, _ = _funcopt_run(init, grads, fo.psgd_kron(0.01, seed=3, options=fo.PsgdKronOptions()))
    for x, y in zip(a[-1], b[-1]):
        assert torch.equal(x, y)


def test_public_widths():
    """No public builder of these families takes more than 11 parameters (optax's widest
    alias); the rarely tuned numbers live in PsgdKronOptions / SoapFactors / other=."""
    import inspect
    funcs = [fo.scale_by_psgd_kron, fo.psgd_kron, fo.muon, fo.scale_by_muon, fo.soap,
             fo.scale_by_soap, fo.sophia, fo.scale_by_sophia, fo.adafactor,
             fo.heavyball.sf_palm_foreach_soap, fo.heavyball.foreach_soap]
    wide = {f.__name__: len(inspect.signature(f).parameters) for f in funcs
            if len(inspect.signature(f).parameters) > 11}
    assert not wide
