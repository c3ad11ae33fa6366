"""levenberg_marquardt(cuda_graph=True): the update from two replayed pieces (linearization,
one attempt) against the eager update, its option checks and its failure paths. On a CPU
the pieces run eagerly; the CUDA tests compare the captured replays with the eager step."""

import pytest
import torch
from torch.func import functional_call

import funcopt as fo
from funcopt.transforms import lm_device

CUDA = torch.cuda.is_available()


def _problem(width, points=48, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    x = torch.linspace(-3, 3, points, dtype=dtype, device=device).unsqueeze(1)
    y = torch.sin(2 * x) + 0.3 * x
    model = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1)).to(dtype=dtype, device=device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return (lambda p, xx: functional_call(model, p, (xx,))), params, (x, y)


def _run(tx, params, batches, steps):
    state, trace = tx.init(params), []
    for i in range(steps):
        upd, state = tx.update(None, state, params, batch=batches[i % len(batches)])
        params = fo.apply_updates(params, upd)
        trace.append((bool(state.accepted), int(state.attempts), float(state.cost)))
    return params, state, trace


def _close(a, b, rtol):
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=rtol), k


# width 4: 13 parameters < 48 residuals (primal Gram); width 32: 97 > 48 (dual Gram)
@pytest.mark.parametrize("width", [4, 32])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("kw", [{}, {"scaling": True}, {"scaling": False},
                                {"rule": fo.Classic()}, {"solver": "cholesky", "max_attempts": 3}])
def test_graphed_update_takes_the_eager_steps(width, per_sample, kw):
    fwd, params, batch = _problem(width)
    res = fo.mse_residuals(fwd, per_sample=per_sample)
    p1, s1, t1 = _run(fo.levenberg_marquardt(res, **kw), params, [batch], 25)
    p2, s2, t2 = _run(fo.levenberg_marquardt(res, cuda_graph=True, **kw), params, [batch], 25)
    assert [t[:2] for t in t1] == [t[:2] for t in t2]  # the same accept/reject sequence
    assert t2[-1][2] < 0.5 * t2[0][2]  # it fits
    for (_, _, c1), (_, _, c2) in zip(t1, t2):
        assert c2 == pytest.approx(c1, rel=1e-8)
    _close(p1, p2, 1e-6)
    for name, a, b in zip(s1._fields, s1, s2):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-12), name


def test_float32_and_batches_of_two_shapes():
    """A last smaller batch is a second program; float32 stays float32."""
    fwd, params, (x, y) = _problem(16, points=40, dtype=torch.float32)
    res = fo.mse_residuals(fwd, per_sample=True)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    tx = fo.levenberg_marquardt(res, cuda_graph=True)
    p2, s2, t2 = _run(tx, params, batches, 12)
    p1, s1, t1 = _run(fo.levenberg_marquardt(res), params, batches, 12)
    assert [t[0] for t in t1] == [t[0] for t in t2]
    assert all(v.dtype == torch.float32 for v in p2.values())
    assert s2.damping.dtype == torch.float32
    _close(p1, p2, 1e-3)


def test_a_failed_factorization_is_a_rejected_attempt(monkeypatch):
    """Cholesky reports failure on the first attempt of a linear fit (whose first attempt is
    otherwise accepted): that attempt moves nothing, the damping goes up as for a rejected
    step (Nielsen: lambda nu, nu = 2), and the second attempt is the update that starts from
    that damping."""
    g = torch.Generator().manual_seed(1)
    A, b = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, generator=g,
                                                                          dtype=torch.float64)
    res, params = (lambda p: A @ p["a"] - b), {"a": torch.zeros(3, dtype=torch.float64)}
    real, calls = torch.linalg.cholesky_ex, []

    def failing_once(M, **kw):
        L, info = real(M, **kw)
        calls.append(1)
        return (L, info + 1) if len(calls) == 1 else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_once)
    tx = fo.levenberg_marquardt(res, cuda_graph=True)
    upd, state = tx.update(None, tx.init(params), params)
    assert len(calls) == 2 and int(state.attempts) == 2 and bool(state.accepted)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    ref = fo.levenberg_marquardt(res, rule=fo.Nielsen(initial_damping=2e-3))
    upd_ref, state_ref = ref.update(None, ref.init(params), params)
    assert int(state_ref.attempts) == 1
    assert torch.allclose(upd["a"], upd_ref["a"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("kw, word", [
    ({"rule": fo.TrustRegion()}, "TrustRegion"),
    ({"geodesic": fo.Geodesic()}, "geodesic"),
    ({"solver": "qr"}, "solver='qr'"),
    ({"solver": "cg"}, "solver='cg'"),
])
def test_options_it_cannot_take_are_refused(kw, word):
    with pytest.raises(ValueError, match="cuda_graph=True") as e:
        fo.levenberg_marquardt(lambda p: p["a"], cuda_graph=True, **kw)
    assert word in str(e.value) and "cuda_graph=False" in str(e.value)


def test_cuda_graph_must_be_a_bool():
    with pytest.raises(TypeError, match="cuda_graph='yes'"):
        fo.levenberg_marquardt(lambda p: p["a"], cuda_graph="yes")


def test_non_finite_residuals_raise_as_the_eager_step():
    params = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    res = lambda p: torch.log(p["a"] - 1.5)  # NaN at a = 1
    for g in (False, True):
        tx = fo.levenberg_marquardt(res, cuda_graph=g)
        with pytest.raises(ValueError, match="non-finite residuals"):
            tx.update(None, tx.init(params), params)


def test_under_vmap_it_says_to_build_without_it():
    tx = fo.levenberg_marquardt(lambda p: p["a"] ** 2 - 1.0, cuda_graph=True)
    params = {"a": torch.ones(3, 2, dtype=torch.float64)}
    state = torch.func.vmap(tx.init)(params)
    with pytest.raises(ValueError, match="cuda_graph=False"):
        torch.func.vmap(lambda p, s: tx.update(None, s, p))(params, state)


def test_the_state_must_match_the_params():
    tx = fo.levenberg_marquardt(lambda p: p["a"] - 1.0, cuda_graph=True)
    state = tx.init({"a": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="state holds 3 parameters"):
        tx.update(None, state, {"a": torch.zeros(4, dtype=torch.float64)})


def test_a_batch_with_an_unhashable_constant_is_refused():
    tx = fo.levenberg_marquardt(lambda p, b: p["a"] - b[0], cuda_graph=True)
    params = {"a": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(TypeError, match="batch holds a _Unhashable"):
        tx.update(None, tx.init(params), params, batch=(torch.ones(3, dtype=torch.float64),
                                                        _Unhashable()))


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]


def test_graph_options_check_is_the_constructor_check():
    with pytest.raises(ValueError, match="TrustRegion"):
        lm_device.check_graph_options(fo.lm_options(rule=fo.TrustRegion()))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("width", [4, 32])
def test_captured_update_on_cuda_takes_the_eager_steps(width):
    fwd, params, batch = _problem(width, device="cuda")
    res = fo.mse_residuals(fwd, per_sample=True)
    p1, s1, t1 = _run(fo.levenberg_marquardt(res), params, [batch], 20)
    tx = fo.levenberg_marquardt(res, cuda_graph=True)
    p2, s2, t2 = _run(tx, params, [batch], 20)
    assert [t[:2] for t in t1] == [t[:2] for t in t2]
    _close(p1, p2, 1e-6)
    assert s2.damping.device.type == "cuda"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_captured_update_replays_without_dispatching_the_step():
    """After the capture an update dispatches a fixed few dozen operations (copies in,
    two replays, one read per attempt, copies out), whatever the step's size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    fwd, params, batch = _problem(32, device="cuda")
    tx = fo.levenberg_marquardt(fo.mse_residuals(fwd, per_sample=True), cuda_graph=True)
    state = tx.init(params)
    for _ in range(2):
        upd, state = tx.update(None, state, params, batch=batch)
    with Count():
        upd, state = tx.update(None, state, params, batch=batch)
    assert Count.n < 120, Count.n


def test_params_of_another_tree_with_as_many_numbers_get_their_own_program():
    """Two trees with the same number of parameters (so the same flat shape) unravel
    differently: each gets its own program, and each fit matches the eager one."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(10, 4, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)

    def res(p):
        v = torch.cat([t.reshape(-1) for t in p.values()])
        return A @ v ** 3 - b + p["a"].sum()  # another unravel gives other residuals

    tx = fo.levenberg_marquardt(res, cuda_graph=True)
    eager = fo.levenberg_marquardt(res)
    for params in ({"a": torch.full((2, 2), 0.5, dtype=torch.float64)},
                   {"a": torch.full((1,), 0.5, dtype=torch.float64),
                    "b": torch.full((3,), 0.7, dtype=torch.float64)}):
        s1, s2, q1, q2 = eager.init(params), tx.init(params), params, params
        for _ in range(5):
            u1, s1 = eager.update(None, s1, q1)
            u2, s2 = tx.update(None, s2, q2)
            q1, q2 = fo.apply_updates(q1, u1), fo.apply_updates(q2, u2)
        _close(q1, q2, 1e-9)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_residual_function_that_reads_on_the_host_is_one_clear_error():
    """``.item()`` in the residual function cannot be captured: a RuntimeError that names
    cuda_graph=False (the warm-up runs it fine; the capture fails)."""
    params = {"a": torch.ones(3, dtype=torch.float64, device="cuda")}

    def res(p):
        scale = float(p["a"].abs().max().item())  # a host read
        return p["a"] * scale - 2.0

    tx = fo.levenberg_marquardt(res, cuda_graph=True)
    with pytest.raises(RuntimeError, match="cuda_graph=False"):
        tx.update(None, tx.init(params), params)
