"""The eager fast paths of scale_by_adam: torch's fused Adam kernel on new tensors, and Python
numbers for step arithmetic on a CPU. Both must give the numbers of the ``_foreach`` path and of
torch.optim, leave their inputs untouched, and step aside where they cannot apply."""

import pytest
import torch

import funcopt as fo
from funcopt.testing import assert_trees_close
from funcopt.transforms import first_order

SHAPES = {"w": (7, 5), "b": (5,), "s": (), "e": (0, 3)}


def _tree(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


@pytest.fixture
def fused_calls(monkeypatch):
    """Count the calls of torch._fused_adam_ (so a test knows which path ran)."""
    calls = []
    real = torch._fused_adam_

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    return calls


def _run(tx, params, n=15, dtype=torch.float32):
    state = tx.init(params)
    for i in range(n):
        u, state = tx.update(_tree(100 + i, dtype), state, params)
        params = fo.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_path_matches_foreach_path_and_torch(monkeypatch, fused_calls, dtype, amsgrad):
    params = _tree(0, dtype)
    tx = fo.adamw(3e-2, weight_decay=1e-2, amsgrad=amsgrad)
    fused, fused_state = _run(tx, params, dtype=dtype)
    assert len(fused_calls) == 15

    monkeypatch.setattr(first_order, "_fusable", lambda *a: False)
    plain, plain_state = _run(tx, params, dtype=dtype)
    assert len(fused_calls) == 15
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_trees_close(fused, plain, rtol=rtol, atol=rtol)
    assert_trees_close(fused_state, plain_state, rtol=rtol, atol=rtol)

    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW(ps.values(), lr=3e-2, weight_decay=1e-2, amsgrad=amsgrad)
    for i in range(15):
        for k, g in _tree(100 + i, dtype).items():
            ps[k].grad = g
        opt.step()
    assert_trees_close(fused, {k: v.detach() for k, v in ps.items()}, rtol=rtol, atol=rtol)


def test_fused_path_is_pure(fused_calls):
    params = _tree(0)
    tx = fo.scale_by_adam()
    state = tx.init(params)
    state = tx.update(_tree(1), state, params)[1]
    grads = _tree(2)
    before = [x.clone() for x in fo.tree_leaves((grads, state, params))]
    u1, s1 = tx.update(grads, state, params)
    u2, s2 = tx.update(grads, state, params)
    assert len(fused_calls) == 3
    for x, y in zip(before, fo.tree_leaves((grads, state, params))):
        assert torch.equal(x, y)
    assert_trees_close(u1, u2, rtol=0, atol=0)
    assert_trees_close(s1, s2, rtol=0, atol=0)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(s1.mu, state.mu) if a.numel())


def _fallback_cases():
    base = _tree(5)
    strided = dict(base, w=torch.randn(7, 10)[:, ::2])  # not contiguous: the kernel misreads it
    return {
        "strided grads": (fo.scale_by_adam(), strided),
        "bf16 moments": (fo.scale_by_adam(mu_dtype=torch.bfloat16), base),
        "eps_root": (fo.scale_by_adam(eps_root=1e-8), base),
        "nesterov": (fo.scale_by_adam(nesterov=True), base),
    }


@pytest.mark.parametrize("case", sorted(_fallback_cases()))
def test_fallback_cases_use_foreach_path_and_match_float64(fused_calls, case):
    tx, grads = _fallback_cases()[case]
    params = _tree(0)
    state = tx.init(params)
    u, _ = tx.update(grads, state, params)
    assert not fused_calls
    # float64 transcription of the first step: m = 0.1 g, v = 0.001 g^2, bias-corrected
    for k, g in grads.items():
        g = g.double()
        m_hat, v_hat = 0.1 * g / 0.1, 0.001 * g * g / 0.001
        if case == "nesterov":  # optax: b1 m / (1 - b1^2) + (1 - b1) g / (1 - b1)
            m_hat = 0.9 * 0.1 * g / (1 - 0.81) + g
        eps_root = 1e-8 if case == "eps_root" else 0.0
        ref = m_hat / ((v_hat + eps_root).sqrt() + 1e-8)
        tol = 2e-2 if case == "bf16 moments" else 1e-5
        torch.testing.assert_close(u[k].double(), ref, rtol=tol, atol=tol)


def test_grads_that_require_grad_take_the_differentiable_path(fused_calls):
    params = _tree(0)
    w = torch.randn(7, 5, requires_grad=True)
    tx = fo.scale_by_adam()
    state = tx.init(params)
    u, state = tx.update(dict(_tree(1), w=w), state, params)
    u, state = tx.update(dict(_tree(2), w=2 * w), state, params)
    assert not fused_calls
    (gw,) = torch.autograd.grad(u["w"].sum(), w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0
    with torch.no_grad():  # no graph to build: the fused kernel serves the same inputs
        tx.update(dict(_tree(1), w=w), tx.init(params), params)
    assert len(fused_calls) == 1


def test_host_number_reads_only_plain_cpu_scalars():
    assert fo.engine.host_number(torch.tensor(3)) == 3
    assert isinstance(fo.engine.host_number(torch.tensor(0.5)), float)
    for keep in (torch.tensor(0.5, requires_grad=True), torch.ones(1), 2.0):
        assert fo.engine.host_number(keep) is keep

    def under_vmap(x):
        assert isinstance(fo.engine.host_number(x[0]), torch.Tensor)  # a batched value is no number
        return x

    torch.func.vmap(under_vmap)(torch.ones(3, 2))


def test_scheduled_betas_on_cpu_match_constant_ones():
    """Schedules are evaluated as tensors and read as numbers on a CPU: same numbers (betas
    exact in float32, as a schedule on an int64 count returns float32)."""
    params = _tree(0, torch.float64)
    const, _ = _run(fo.adam(1e-2, b1=0.5, b2=0.75), params, dtype=torch.float64)
    sched, _ = _run(fo.chain(fo.scale_by_adam(lambda t: 0.5 + 0 * t, lambda t: 0.75 + 0 * t),
                             fo.scale_by_learning_rate(1e-2)), params, dtype=torch.float64)
    assert_trees_close(sched, const, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(16,), (12,)])
def test_updates_of_another_shape_raise_instead_of_reaching_the_kernel(fused_calls, shape):
    """The kernel does not check shapes (it would run past the smaller buffers): the leaf
    engine refuses the step first, naming the leaf and both shapes."""
    p = {"w": torch.zeros(4, 3)}
    tx = fo.scale_by_adam()
    with pytest.raises(ValueError, match=r"leaf \['w'\].*shape .*\(4, 3\)"):
        tx.update({"w": torch.randn(shape)}, tx.init(p), p)
    assert not fused_calls


def test_float16_steps_run_in_float32(fused_calls):
    """float16 moments underflow (eps = 1e-8 is 0 in float16): the moments are kept in float32
    and the step computed in float32 (the kernel may run on it), the update in float16. The
    same step as float32 parameters, rounded to float16."""
    p = _tree(0, torch.float16)
    tx = fo.scale_by_adam()
    u, s = tx.update(_tree(1, torch.float16), tx.init(p), p)
    assert u["w"].dtype == torch.float16 and s.mu[0].dtype == torch.float32
    p32 = {k: v.float() for k, v in p.items()}
    u32, _ = tx.update({k: v.float() for k, v in _tree(1, torch.float16).items()},
                       tx.init(p32), p32)
    for k in u:
        torch.testing.assert_close(u[k], u32[k].half())
    tx.update(_tree(1, torch.bfloat16), tx.init(_tree(0, torch.bfloat16)), _tree(0, torch.bfloat16))
    assert len(fused_calls) == 3  # the float16, float32 and bfloat16 steps


def test_forward_mode_ad_keeps_its_tangents(fused_calls):
    """Dual tensors neither require grad nor are torch.func-wrapped: the fast paths must still
    step aside, or the tangents are dropped silently."""
    import torch.autograd.forward_ad as fwad

    p, g, t = _tree(0, torch.float64), _tree(1, torch.float64), _tree(2, torch.float64)
    tx = fo.adam(1e-2)
    state = tx.update(_tree(3, torch.float64), tx.init(p), p)[1]
    fused_calls.clear()  # that step had no duals: the kernel served it
    with fwad.dual_level():
        duals = {k: fwad.make_dual(g[k], t[k]) for k in g}
        u, _ = tx.update(duals, state, p)
        tangents = {k: fwad.unpack_dual(v).tangent for k, v in u.items()}
    assert not fused_calls
    _, expected = torch.func.jvp(lambda gg: tx.update(gg, state, p)[0], (g,), (t,))
    assert_trees_close(tangents, expected, rtol=1e-12, atol=1e-14)


def test_negative_bit_views_take_the_foreach_path(fused_calls):
    w = torch.tensor(1 + 2j).conj().imag  # a contiguous (0-d) float32 with the negative bit
    assert w.is_neg() and w.is_contiguous()
    p = {"w": torch.zeros(())}
    tx = fo.scale_by_adam()
    u, _ = tx.update({"w": w}, tx.init(p), p)
    assert not fused_calls
    torch.testing.assert_close(u["w"], torch.sign(w.resolve_neg()), rtol=1e-6, atol=0)


def test_tensor_eps_root_compiles_fullgraph():
    p = _tree(0)
    tx = fo.scale_by_adam(eps_root=torch.tensor(1e-8))
    state = tx.init(p)
    step = torch.compile(lambda g, s: tx.update(g, s, p), backend="eager", fullgraph=True)
    u, _ = step(_tree(1), state)
    # the compiled step computes 1 - b2**t from float32 0-d tensors (0.999 is 0.99900001 in
    # float32: 1.3e-5 relative on the first step's bias correction), eager CPU steps in float64
    assert_trees_close(u, tx.update(_tree(1), state, p)[0], rtol=3e-5, atol=1e-7)
