"""The Triton kernel behind fo.adamw's eager CUDA steps (funcopt/triton_kernels.py).

On a CPU the kernel runs in Triton's interpreter on CPU tensors (the module's private device
switch is widened for these tests); on a GPU it runs compiled. Every test compares the fast
path with an independent reference: the plain chain it replaces, a float64 AdamW written here,
torch.optim.AdamW; and checks that the kernel is (or is not) launched.
"""

from __future__ import annotations

import pytest
import torch

import funcopt as fo
from funcopt import triton_kernels as tk

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
SHAPES = [(), (0,), (3,), (1024,), (1500,), (2048, 3), (7, 5), (3000,)]


@pytest.fixture
def launches(monkeypatch):
    """The number of kernel launches (one per dtype group) made during the test."""
    calls: list[int] = []
    real = tk._launch

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "_launch", spy)
    return calls


@pytest.fixture
def interpreter(monkeypatch, launches):
    """Run the kernel on CPU tensors in Triton's interpreter. The interpreter casts float32 to
    bfloat16 by truncation where the GPU rounds to nearest even; the cast is made to round as
    the GPU does, so that bfloat16 results can be compared to the chain's tightly."""
    interp = pytest.importorskip("triton.runtime.interpreter")
    tl = pytest.importorskip("triton.language")
    np = pytest.importorskip("numpy")
    monkeypatch.setattr(tk, "_DEVICE_TYPES", ("cuda", "cpu"))
    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl"):
        pytest.skip("this Triton's interpreter has no cast_impl to round bfloat16 with")
    real = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interp.TensorHandle(bits, tl.bfloat16)
        return real(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    return launches


def _tree(shapes, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return {f"x{i}": torch.randn(s, generator=g).to(dtype).to(device)
            for i, s in enumerate(shapes)}


def _chain(lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """What fo.adamw computes without the kernel: its chain of building blocks."""
    decay = (fo.add_decayed_weights(wd),) if wd else ()
    return fo.chain(fo.scale_by_adam(b1, b2, eps), *decay, fo.scale_by_learning_rate(lr))


def _run(tx, params, steps, dtype, device):
    """Params, last updates and state after ``steps`` eager steps on fixed random grads."""
    state = tx.init(params)
    for k in range(steps):
        grads = _tree([tuple(x.shape) for x in params.values()], dtype, 100 + k, device)
        updates, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, updates)
    return params, updates, state


def _ulps(dtype):
    return {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]


def _close(got, want, rtol, ulps=0.0):
    """``got`` equals ``want`` to ``rtol`` of the largest magnitude plus ``ulps`` of the
    half-precision format (a flipped rounding in the last bit)."""
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel():
            scale = b.double().abs().max().item()
            torch.testing.assert_close(a.double(), b.double(), rtol=0,
                                       atol=(rtol + 2 * ulps) * scale + 1e-30)


# Tolerances: the kernel computes as torch's CUDA fused Adam (betas rounded to float32, the
# moments as fma(b, m, fma(-b, g, g)); the chain's CPU step runs torch's CPU fused kernel,
# which weights the new gradient by float32(1 - b) and so stores v_t about 1.3e-5 (relative)
# away for b2 = 0.999 (its bias correction compensates: the updates agree to ~3e-6).
CHAIN_TOL = {"u": 1e-5, "mu": 3e-6, "nu": 3e-5, "p": 1e-6}


def _check_against_chain(shapes, dtype, wd, device, steps=4):
    params = _tree(shapes, dtype, 0, device)
    p1, u1, s1 = _run(fo.adamw(1e-3, weight_decay=wd), params, steps, dtype, device)
    p2, u2, s2 = _run(_chain(1e-3, wd), params, steps, dtype, device)
    ulps = _ulps(dtype)
    _close(list(u1.values()), list(u2.values()), CHAIN_TOL["u"], ulps)
    _close(list(p1.values()), list(p2.values()), CHAIN_TOL["p"], ulps)
    _close(s1[0].mu, s2[0].mu, CHAIN_TOL["mu"], ulps)
    _close(s1[0].nu, s2[0].nu, CHAIN_TOL["nu"], ulps)
    assert [type(s) for s in s1] == [type(s) for s in s2]
    assert [int(s.count) for s in s1] == [int(s.count) for s in s2] == [steps] * len(s1)
    assert s1[-1].learning_rate.item() == s2[-1].learning_rate.item()


def _adamw64(params, steps, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW in float64 with the betas the kernel uses (float32-rounded), on the grads of
    :func:`_run`."""
    b1, b2 = torch.tensor([b1, b2], dtype=torch.float32).tolist()
    p = {k: v.double() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    u = {}
    for k in range(steps):
        grads = _tree([tuple(x.shape) for x in params.values()], torch.float32, 100 + k)
        t = k + 1
        for name, x in p.items():
            g = grads[name].double()
            m[name] = b1 * m[name] + (1 - b1) * g
            v2[name] = b2 * v2[name] + (1 - b2) * g * g
            d = (m[name] / (1 - b1**t)) / ((v2[name] / (1 - b2**t)).sqrt() + eps)
            u[name] = -lr * (d + wd * x)
            p[name] = x + u[name]
    return p, u, m, v2


# --------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_interpreter_matches_chain(interpreter, dtype, wd):
    _check_against_chain(SHAPES, dtype, wd, "cpu")
    assert interpreter  # the kernel ran (once per step)


def test_interpreter_matches_float64_adamw(interpreter):
    params = _tree(SHAPES, torch.float32, 0)
    got, u, state = _run(fo.adamw(1e-2, weight_decay=0.1), params, 5, torch.float32, "cpu")
    want, u64, m, v = _adamw64(params, 5, 1e-2, 0.1)
    _close(list(u.values()), [x.float() for x in u64.values()], 2e-6)
    _close(list(got.values()), [x.float() for x in want.values()], 2e-7)
    _close(state[0].mu, [x.float() for x in m.values()], 1e-6)
    _close(state[0].nu, [x.float() for x in v.values()], 1e-6)
    assert len(interpreter) == 5


def test_interpreter_matches_torch_optim(interpreter):
    params = _tree(SHAPES, torch.float32, 0)
    got, _, _ = _run(fo.adamw(1e-2, weight_decay=0.1), params, 5, torch.float32, "cpu")
    ps = [torch.nn.Parameter(x.clone()) for x in params.values()]
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)
    for k in range(5):
        grads = _tree(SHAPES, torch.float32, 100 + k)
        for p, g in zip(ps, grads.values()):
            p.grad = g
        opt.step()
    _close(list(got.values()), [p.detach() for p in ps], 5e-7)  # a few float32 roundings
    assert len(interpreter) == 5


def test_interpreter_schedule_and_tensor_learning_rate(interpreter):
    """A schedule and a 0-d tensor learning rate are read on the device by the kernel."""
    for lr in (fo.schedules.linear_schedule(1e-2, 1e-3, 4), torch.tensor(3e-3)):
        params = _tree(SHAPES[:5], torch.float32, 0)
        _, u1, s1 = _run(fo.adamw(lr, weight_decay=1e-2), params, 3, torch.float32, "cpu")
        _, u2, s2 = _run(_chain(lr, 1e-2), params, 3, torch.float32, "cpu")
        _close(list(u1.values()), list(u2.values()), CHAIN_TOL["u"])
        assert s1[-1].learning_rate.item() == pytest.approx(s2[-1].learning_rate.item())
    assert len(interpreter) == 6


def test_interpreter_declines_mixed_dtypes_and_groups_many_leaves(interpreter):
    """A tree of float32 and bfloat16 leaves: the chain's fused path declines it (one dtype
    only) and its foreach path rounds differently, so the kernel declines it too and the
    numbers are the chain's exactly; 300 small float32 leaves share one launch."""
    params = {"a": _tree(SHAPES, torch.float32, 0), "b": _tree(SHAPES, torch.bfloat16, 1)}
    state_f, state_c = fo.adamw(1e-3).init(params), _chain(1e-3, 1e-4).init(params)
    grads = fo.tree_map(lambda x: torch.randn_like(x), params)
    u1, _ = fo.adamw(1e-3).update(grads, state_f, params)
    u2, _ = _chain(1e-3, 1e-4).update(grads, state_c, params)
    assert len(interpreter) == 0
    for x, y in zip(fo.tree_leaves(u1), fo.tree_leaves(u2)):
        assert torch.equal(x, y)
    params = [torch.randn(5) for _ in range(300)]
    grads = [torch.randn(5) for _ in range(300)]
    u1, _ = fo.adamw(1e-3).update(grads, fo.adamw(1e-3).init(params), params)
    u2, _ = _chain(1e-3, 1e-4).update(grads, _chain(1e-3, 1e-4).init(params), params)
    _close(u1, u2, CHAIN_TOL["u"])
    assert len(interpreter) == 1


def test_interpreter_params_none_without_decay(interpreter):
    """weight_decay=0 needs no params (the chain needs none); with decay the chain's error."""
    params = _tree(SHAPES[:4], torch.float32, 0)
    grads = _tree(SHAPES[:4], torch.float32, 1)
    tx = fo.adamw(1e-3, weight_decay=0.0)
    u1, _ = tx.update(grads, tx.init(params))
    u2, _ = _chain(1e-3, 0.0).update(grads, _chain(1e-3, 0.0).init(params))
    _close(list(u1.values()), list(u2.values()), CHAIN_TOL["u"])
    assert len(interpreter) == 1
    with pytest.raises(ValueError, match="add_decayed_weights"):
        fo.adamw(1e-3).update(grads, fo.adamw(1e-3).init(params))


def _declined(interpreter, params, grads, tx=None, ref=None):
    tx = tx or fo.adamw(1e-3, weight_decay=1e-2)
    ref = ref or _chain(1e-3, 1e-2)
    u1, s1 = tx.update(grads, tx.init(params), params)
    u2, s2 = ref.update(grads, ref.init(params), params)
    assert not interpreter  # the chain ran: the very same ops
    for a, b in zip(fo.tree_leaves(u1), fo.tree_leaves(u2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_leaf_takes_the_chain(interpreter):
    params = {"w": torch.randn(6, 4).t(), "b": torch.randn(3)}
    grads = {"w": torch.randn(6, 4).t(), "b": torch.randn(3)}
    _declined(interpreter, params, grads)


def test_requires_grad_and_float64_take_the_chain(interpreter):
    params = {"w": torch.randn(5, requires_grad=True)}
    _declined(interpreter, params, {"w": torch.randn(5)})
    _declined(interpreter, {"w": torch.randn(5, dtype=torch.float64)},
              {"w": torch.randn(5, dtype=torch.float64)})


def test_tensor_beta_takes_the_chain(interpreter):
    params, grads = {"w": torch.randn(5)}, {"w": torch.randn(5)}
    b1 = torch.tensor(0.9)
    tx = fo.adamw(1e-3, b1=b1, weight_decay=1e-2)
    _declined(interpreter, params, grads, tx, _chain(1e-3, 1e-2, b1=b1))


def test_vmap_and_grad_take_the_chain(interpreter):
    """Under torch.func transforms the kernel is not launched and the results are the
    chain's."""
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tx, ref = fo.adamw(1e-2, weight_decay=0.1), _chain(1e-2, 0.1)
    gb = {"w": torch.randn(5, 4, 3), "b": torch.randn(5, 3)}

    def batched(t):
        return torch.func.vmap(lambda g: t.update(g, t.init(params), params)[0])(gb)

    for a, b in zip(fo.tree_leaves(batched(tx)), fo.tree_leaves(batched(ref))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = {"w": torch.randn(4, 3), "b": torch.randn(3)}

    def loss(t):
        def f(p):
            new = fo.apply_updates(p, t.update(grads, t.init(p), p)[0])
            return sum((x**2).sum() for x in new.values())
        return torch.func.grad(f)(params)

    for a, b in zip(fo.tree_leaves(loss(tx)), fo.tree_leaves(loss(ref))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not interpreter


def test_compiled_step_takes_the_chain(interpreter):
    params, grads = {"w": torch.randn(8)}, {"w": torch.randn(8)}
    tx = fo.adamw(1e-2, weight_decay=0.1)

    @torch.compile(fullgraph=True, backend="eager")
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return fo.apply_updates(p, u), s

    got, _ = step(params, tx.init(params), grads)
    want = fo.apply_updates(params, _chain(1e-2, 0.1).update(
        grads, _chain(1e-2, 0.1).init(params), params)[0])
    torch.testing.assert_close(got["w"], want["w"])
    assert not interpreter


def test_without_triton_the_chain_runs(interpreter, monkeypatch):
    monkeypatch.setattr(tk, "_triton", lambda: None)
    _declined(interpreter, {"w": torch.randn(5)}, {"w": torch.randn(5)})


# --------------------------------------------------------------------------- flat outputs, cache


def _bits(x):
    """The bytes of ``x`` (equal bytes: the very same numbers, signed zeros and NaNs too)."""
    return x.detach().reshape(-1).view(torch.uint8) if x.numel() else x


def _same_bits(got, want):
    got, want = fo.tree_leaves(got), fo.tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _byte_span(x):
    start = x.untyped_storage().data_ptr() + x.storage_offset() * x.element_size()
    return start, start + x.numel() * x.element_size()


def _clone_tree(tree):
    return fo.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _step(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return fo.apply_updates(params, updates), updates, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_outputs_are_fresh_contiguous_aligned_and_inputs_untouched(interpreter, dtype):
    """The pure contract with flat output buffers: every output leaf is a contiguous tensor of
    its input's shape, dtype and device, starting 16-byte aligned; no output shares a byte
    with any input or with another output; the inputs keep their values, also when they are
    themselves the previous step's outputs (views of one buffer)."""
    shapes = SHAPES + [(0, 3), (1, 1, 9)]
    tx = fo.adamw(1e-3, weight_decay=1e-2)
    params = _tree(shapes, dtype, 0)
    state = tx.init(params)
    for k in range(3):
        grads = _tree(shapes, dtype, 100 + k)
        inputs = (params, state, grads)
        before = _clone_tree(inputs)
        updates, new_state = tx.update(grads, state, params)
        _same_bits(inputs, before)  # nothing written into the inputs
        outs = [*fo.tree_leaves(updates), *new_state[0].mu, *new_state[0].nu]
        likes = [*params.values(), *state[0].mu, *state[0].nu]
        for out, like in zip(outs, likes):
            assert out.shape == like.shape and out.dtype == like.dtype
            assert out.device == like.device and out.is_contiguous()
            assert not out.requires_grad
        spans = sorted(_byte_span(x) for x in outs + fo.tree_leaves(inputs) if x.numel())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end  # no two tensors (outputs, inputs) overlap
        assert all(x.data_ptr() % 16 == 0 for x in outs if x.numel())
        params, state = fo.apply_updates(params, updates), new_state
    assert len(interpreter) == 3


def test_interpreter_fed_back_outputs_match_fresh_copies_bitwise(interpreter):
    """Five steps that feed the kernel its own outputs (moments that are views of one flat
    buffer) give the very bits of steps whose inputs are copied into separate tensors first,
    and of steps run with an empty layout cache; and they stay within the chain's tolerance."""
    shapes = SHAPES + [(5, 1, 3)]
    tx = fo.adamw(1e-2, weight_decay=0.1)
    params = _tree(shapes, torch.float32, 0)
    fed = copied = (params, tx.init(params))
    for k in range(5):
        grads = _tree(shapes, torch.float32, 100 + k)
        p1, u1, s1 = _step(tx, *fed, grads)
        tk._LAYOUTS.clear()
        p2, u2, s2 = _step(tx, *_clone_tree(copied), _clone_tree(grads))
        _same_bits((p1, u1, s1), (p2, u2, s2))
        fed, copied = (p1, s1), (p2, s2)
    assert len(interpreter) == 10
    want_p, want_u, want_s = _run(_chain(1e-2, 0.1), params, 5, torch.float32, "cpu")
    _close(list(fed[0].values()), list(want_p.values()), CHAIN_TOL["p"])
    _close(fed[1][0].mu, want_s[0].mu, CHAIN_TOL["mu"])
    _close(fed[1][0].nu, want_s[0].nu, CHAIN_TOL["nu"])


def test_interpreter_layout_cache_follows_shapes_dtypes_trees_and_reused_state(interpreter):
    """One transform stepped on trees that change between steps: the same numels in other
    shapes ((2, 6), (6, 2), (12,)), other dtypes, another tree structure, an empty leaf, more
    trees than the cache holds. Each result has its own shapes and equals, bit for bit, the
    result computed with an empty cache; a state stepped twice gives the same result twice."""
    tx = fo.adamw(1e-3, weight_decay=1e-2)
    cases = [([(2, 6), (3,)], torch.float32), ([(6, 2), (3,)], torch.float32),
             ([(12,), (3,)], torch.float32), ([(2, 6), (3,)], torch.bfloat16),
             ([(2, 6), (3,)], torch.float16), ([(2, 6), (0,), (3,)], torch.float32)]
    cases += [([(k + 1,)], torch.float32) for k in range(tk._MAX_LAYOUTS + 1)]
    cases += cases[:3]  # back to trees whose layout was evicted or is still cached
    for i, (shapes, dtype) in enumerate(cases):
        params = _tree(shapes, dtype, i)
        if i % 2:  # another tree structure: a list instead of a dict
            params = list(params.values())
        grads = fo.tree_map(torch.randn_like, params)
        state = tx.init(params)
        u1, s1 = tx.update(grads, state, params)
        u2, s2 = tx.update(grads, state, params)  # the same state object again
        _same_bits((u1, s1), (u2, s2))
        assert [x.shape for x in fo.tree_leaves(u1)] == [x.shape for x in fo.tree_leaves(params)]
        tk._LAYOUTS.clear()
        _same_bits((u1, s1), tx.update(grads, state, params))
        want, _ = _chain(1e-3, 1e-2).update(grads, _chain(1e-3, 1e-2).init(params), params)
        _close(fo.tree_leaves(u1), fo.tree_leaves(want), CHAIN_TOL["u"], _ulps(dtype))
    assert len(interpreter) == 3 * len(cases)


def test_interpreter_state_of_other_shapes_takes_the_chain(interpreter):
    """Moments of another shape than the gradients (a state from another tree) are not
    stepped by the kernel: the chain runs and raises its own error."""
    tx, ref = fo.adamw(1e-3, weight_decay=1e-2), _chain(1e-3, 1e-2)
    params, grads = {"w": torch.randn(2, 3)}, {"w": torch.randn(2, 3)}
    other = {"w": torch.randn(3, 2)}
    for t in (tx, ref):
        with pytest.raises(ValueError, match="the state holds"):
            t.update(grads, t.init(other), params)
    assert not interpreter


def test_interpreter_unaligned_views_of_one_buffer(interpreter):
    """Leaves that are views at odd offsets of one buffer (not 16-byte aligned) are addressed
    from the lowest one and give the chain's numbers."""
    buf, gbuf = torch.randn(1 + 100 + 3000), torch.randn(3101)
    params = {"a": buf[1:101], "b": buf[101:].view(30, 100)}
    grads = {"a": gbuf[1:101], "b": gbuf[101:].view(30, 100)}
    before = _clone_tree((params, grads))
    _, u1, _ = _step(fo.adamw(1e-3, weight_decay=1e-2), params,
                     fo.adamw(1e-3).init(params), grads)
    _, u2, _ = _step(_chain(1e-3, 1e-2), params, _chain(1e-3, 1e-2).init(params), grads)
    _close(list(u1.values()), list(u2.values()), CHAIN_TOL["u"])
    _same_bits((params, grads), before)
    assert len(interpreter) == 1


# --------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_cuda_matches_chain(launches, dtype, wd):
    _check_against_chain(SHAPES, dtype, wd, "cuda", steps=6)
    assert len(launches) == 6


@cuda
def test_cuda_matches_float64_adamw(launches):
    params = _tree(SHAPES, torch.float32, 0)
    got, u, state = _run(fo.adamw(1e-2, weight_decay=0.1), {k: v.cuda() for k, v in params.items()},
                         5, torch.float32, "cuda")
    want, u64, m, v = _adamw64(params, 5, 1e-2, 0.1)
    _close([x.cpu() for x in u.values()], [x.float() for x in u64.values()], 5e-6)
    _close([x.cpu() for x in got.values()], [x.float() for x in want.values()], 3e-7)
    _close([x.cpu() for x in state[0].mu], [x.float() for x in m.values()], 2e-6)
    _close([x.cpu() for x in state[0].nu], [x.float() for x in v.values()], 2e-6)
    assert len(launches) == 5


@cuda
def test_cuda_matches_torch_fused_adamw(launches):
    """Against torch.optim.AdamW(fused=True): torch computes the bias corrections with a
    float32 pow, the kernel in float64 (differences up to ~3e-5 of a step in early steps)."""
    params = _tree(SHAPES, torch.float32, 0, "cuda")
    got, _, _ = _run(fo.adamw(1e-2, weight_decay=0.1), params, 5, torch.float32, "cuda")
    ps = [torch.nn.Parameter(x.clone()) for x in params.values()]
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)
    for k in range(5):
        for p, g in zip(ps, _tree(SHAPES, torch.float32, 100 + k, "cuda").values()):
            p.grad = g
        opt.step()
    _close(list(got.values()), [p.detach() for p in ps], 1e-6)
    assert len(launches) == 5


@cuda
def test_cuda_many_small_leaves_one_launch(launches):
    shapes = [(37,)] * 500 + [(4096, 3), (1,), (0,)]
    params = _tree(shapes, torch.float32, 0, "cuda")
    _check_against_chain(shapes, torch.float32, 1e-2, "cuda", steps=2)
    tx = fo.adamw(1e-3)
    launches.clear()
    tx.update(_tree(shapes, torch.float32, 1, "cuda"), tx.init(params), params)
    assert len(launches) == 1


@cuda
def test_cuda_unaligned_views_and_graph_capture(launches):
    """Leaves that are views at odd offsets of one buffer (no 16-byte alignment) still give
    the chain's numbers; under CUDA-graph capture the chain runs (and is captured)."""
    buf, gbuf = torch.randn(1 + 100 + 3000, device="cuda"), torch.randn(3101, device="cuda")
    params = {"a": buf[1:101], "b": buf[101:].view(30, 100)}
    grads = {"a": gbuf[1:101], "b": gbuf[101:].view(30, 100)}
    tx, ref = fo.adamw(1e-3, weight_decay=1e-2), _chain(1e-3, 1e-2)
    u1, _ = tx.update(grads, tx.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    _close(list(u1.values()), list(u2.values()), CHAIN_TOL["u"])
    assert len(launches) == 1
    state = tx.init(params)
    tx.update(grads, state, params)  # warm up outside the capture
    launches.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = tx.update(grads, state, params)
    graph.replay()
    _close(list(out.values()), list(u2.values()), CHAIN_TOL["u"])
    assert not launches


@cuda
def test_cuda_vmap_takes_the_chain(launches):
    params = {"w": torch.randn(4, 3, device="cuda")}
    gb = {"w": torch.randn(5, 4, 3, device="cuda")}
    tx, ref = fo.adamw(1e-2), _chain(1e-2, 1e-4)
    got = torch.func.vmap(lambda g: tx.update(g, tx.init(params), params)[0])(gb)
    want = torch.func.vmap(lambda g: ref.update(g, ref.init(params), params)[0])(gb)
    torch.testing.assert_close(got["w"], want["w"], rtol=0, atol=0)
    assert not launches


# --------------------------------------------------------------------------- compiled, no GPU


@pytest.mark.parametrize("has_sum", [False, True])
@pytest.mark.parametrize("dtype, moments, stores", [("fp32", "fp32", 6), ("bf16", "bf16", 3),
                                                    ("fp16", "fp32", 5)])
def test_kernel_compiles_for_h100_with_vector_loads(dtype, moments, stores, has_sum, monkeypatch):
    """The kernel compiles for sm_90 without a GPU (Triton's bundled ptxas), with IEEE division
    and square root, and full aligned blocks move data in 128-bit loads and stores (float16
    parameters keep float32 moments: each tensor's alignment is stated in its own elements);
    with ``HAS_SUM`` the sum ``p + u`` is stored as ``u`` is."""
    pytest.importorskip("triton.backends.nvidia")
    compiler = pytest.importorskip("triton.backends.compiler")
    import triton.language as tl

    monkeypatch.setattr(tk, "tl", tl)  # what tk._kernel sets on the first build
    fn = triton.jit(tk._adamw_kernel)
    pointers = {**dict.fromkeys(["p_ptr", "g_ptr", "u_ptr", "s_ptr"], f"*{dtype}"),
                **dict.fromkeys(["m_ptr", "v_ptr", "mo_ptr", "vo_ptr"], f"*{moments}")}
    pointers = {k: pointers[k] for k in ["p_ptr", "g_ptr", "m_ptr", "v_ptr", "u_ptr", "mo_ptr",
                                         "vo_ptr", "s_ptr"]}
    signature = {**pointers, "table": "*i64", "work": "*i64", "neg_bc": "*fp64",
                 "lr_ptr": "*fp32", **dict.fromkeys(["b1", "b2", "c1", "c2", "eps", "wd"], "fp32"),
                 **dict.fromkeys(["HAS_WD", "HAS_SUM", "PTX", "MASKED", "ALIGN", "ALIGN_M",
                                  "BLOCK"], "constexpr")}
    constants = {"HAS_WD": True, "HAS_SUM": has_sum, "PTX": True, "MASKED": False,
                 "ALIGN": 4 if dtype == "fp32" else 8, "ALIGN_M": 4 if moments == "fp32" else 8,
                 "BLOCK": 1024}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(12)}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants,
                                       attrs=attrs)
    ptx = triton.compile(source, target=compiler.GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4}).asm["ptx"]
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and "approx" not in ptx
    assert ("add.rn.f32" in ptx) == has_sum  # p + u: an add of the rounded u, never an fma
    per_u = 2 if dtype == "fp32" else 1  # v4 stores of one block's u (8 elements a thread)
    assert ptx.count("st.global.v4") == stores + has_sum * per_u  # u, m, v (and p + u)
