"""fo.cuda_graph: a captured step gives the pure step's numbers; bad input is refused clearly."""

import pytest
import torch

import funcopt as fo

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _tree(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 5, generator=g).to(device), "b": [torch.randn(5, generator=g).to(device)]}


def _step(tx):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return fo.apply_updates(p, u), s
    return step


def _clone(tree):
    return fo.tree_map(torch.clone, tree)


def _assert_trees_equal(a, b):
    la, lb = fo.tree_leaves(a), fo.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert torch.equal(x, y), (x - y).abs().max()


def test_refuses_cpu_leaves():
    tx = fo.adamw(1e-2)
    p = _tree("cpu")
    with pytest.raises(ValueError, match="leaf 0 .* is on cpu.*CUDA device"):
        fo.cuda_graph(_step(tx), p, tx.init(p), _tree("cpu", 1))


def test_refuses_non_tensor_leaves():
    with pytest.raises(TypeError, match="leaf 0 .* is a float"):
        fo.cuda_graph(lambda p, s: (p, s), {"lr": 0.1}, ())


def test_refuses_no_warmup():
    with pytest.raises(ValueError, match="warmup=0"):
        fo.cuda_graph(lambda p, s: (p, s), torch.zeros(2), (), warmup=0)


@cuda
def test_eager_step_matches_pure_step_and_capture_leaves_inputs_alone(monkeypatch):
    """Bit for bit against the same step run eagerly. Eager fo.adamw on CUDA takes the Triton
    kernel, which capture does not (its block table is copied from the host): turned off here
    so both sides run the same operations; the next test bounds the kernel's difference."""
    from funcopt import triton_kernels
    monkeypatch.setattr(triton_kernels, "_DEVICE_TYPES", ())
    tx = fo.adamw(1e-2, weight_decay=0.1)
    p = _tree("cuda")
    s = tx.init(p)
    p_ref, s_ref = _clone(p), _clone(s)
    step = _step(tx)
    graphed = fo.cuda_graph(step, p, s, _tree("cuda", 1))
    _assert_trees_equal(p, p_ref)  # the warm-up ran on copies
    _assert_trees_equal(s, s_ref)
    for k in range(4):
        g = _tree("cuda", 10 + k)  # new tensors each call: copied into the captured ones
        p_ref, s_ref = step(p_ref, s_ref, g)
        out_p, out_s = graphed(p, s, g)
        assert out_p is p and out_s is s
        _assert_trees_equal(p, p_ref)
        _assert_trees_equal(s, s_ref)


@cuda
def test_captured_adamw_agrees_with_the_eager_triton_step_to_rounding():
    """With the Triton kernel on, the eager step (kernel) and the captured one (foreach chain)
    agree to float32 rounding over five steps."""
    tx = fo.adamw(1e-2, weight_decay=0.1)
    p = _tree("cuda")
    s = tx.init(p)
    p_ref, s_ref = _clone(p), _clone(s)
    step = _step(tx)
    graphed = fo.cuda_graph(step, p, s, _tree("cuda", 1))
    for k in range(5):
        g = _tree("cuda", 10 + k)
        p_ref, s_ref = step(p_ref, s_ref, g)
        graphed(p, s, g)
    for x, y in zip(fo.tree_leaves((p, s)), fo.tree_leaves((p_ref, s_ref))):
        torch.testing.assert_close(x, y, rtol=4e-6, atol=1e-7)


@cuda
def test_compiled_donated_flat_step_matches_uncaptured():
    torch._dynamo.reset()
    tx = fo.adamw(1e-2, weight_decay=0.1)
    flat, _ = fo.ravel(_tree("cuda"))
    grads, _ = fo.ravel(_tree("cuda", 1))
    s = tx.init(flat)
    compiled = torch.compile(fo.donated(_step(tx)), fullgraph=True)
    p_ref, s_ref = flat.clone(), _clone(s)
    graphed = fo.cuda_graph(compiled, flat, s, grads)
    for _ in range(3):
        p_ref, s_ref = compiled(p_ref, s_ref, grads)
        flat, s = graphed(flat, s, grads)  # the captured grads themselves: no copy
    _assert_trees_equal(flat, p_ref)
    _assert_trees_equal(s, s_ref)


@cuda
def test_whole_training_step_with_new_batches():
    torch.manual_seed(0)
    w = {"w1": torch.randn(4, 8, device="cuda") * 0.5, "w2": torch.randn(8, 1, device="cuda") * 0.5}
    tx = fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-2))

    def loss(p, x, y):
        return ((torch.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    def train_step(p, s, x, y):
        g = torch.func.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return fo.apply_updates(p, u), s

    batches = [(torch.randn(16, 4, device="cuda"), torch.randn(16, 1, device="cuda")) for _ in range(5)]
    s = tx.init(w)
    p_ref, s_ref, start = _clone(w), _clone(s), _clone(w)
    graphed = fo.cuda_graph(train_step, w, s, *batches[0])
    for x, y in batches:
        p_ref, s_ref = train_step(p_ref, s_ref, x, y)
        w, s = graphed(w, s, x, y)
    for a, b in zip(fo.tree_leaves((w, s)), fo.tree_leaves((p_ref, s_ref))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (w["w1"] - start["w1"]).abs().max() > 1e-3  # the parameters moved


@cuda
def test_host_read_is_refused_with_the_cause():
    def step(p, s):
        if p.sum().item() > 1e9:  # a host read: not capturable
            p = p * 0
        return p + 1, s

    with pytest.raises(RuntimeError, match="reads a device value on the host"):
        fo.cuda_graph(step, torch.zeros(3, device="cuda"), ())


@cuda
def test_other_structures_are_refused():
    tx = fo.sgd(0.1)
    p = _tree("cuda")
    s = tx.init(p)
    graphed = fo.cuda_graph(_step(tx), p, s, _tree("cuda", 1))
    with pytest.raises(ValueError, match="argument 2 has another tree structure"):
        graphed(p, s, {"w": torch.zeros(7, 5, device="cuda")})
    bad = _tree("cuda", 1)
    bad["w"] = bad["w"].double()
    with pytest.raises(ValueError, match="leaf 1 of argument 2 is .*float64.*captured as"):
        graphed(p, s, bad)


@cuda
@pytest.mark.parametrize("nesterov", [False, True])
def test_foreach_path_of_adam_captures(monkeypatch, nesterov):
    """scale_by_adam's _foreach path (taken where torch's fused kernel does not apply) has no
    host read on a GPU, so it captures and matches the uncaptured step."""
    from funcopt import triton_kernels
    from funcopt.transforms import first_order
    monkeypatch.setattr(first_order, "_fusable", lambda *a: False)
    monkeypatch.setattr(triton_kernels, "_DEVICE_TYPES", ())  # the eager side's chain, too
    tx = fo.adamw(1e-2, weight_decay=0.1, nesterov=nesterov)
    p = _tree("cuda")
    s = tx.init(p)
    p_ref, s_ref = _clone(p), _clone(s)
    step = _step(tx)
    g = _tree("cuda", 1)
    graphed = fo.cuda_graph(step, p, s, g)
    for _ in range(3):
        p_ref, s_ref = step(p_ref, s_ref, g)
        p, s = graphed(p, s, g)
    _assert_trees_equal(p, p_ref)
    _assert_trees_equal(s, s_ref)


@cuda
def test_graph_keeps_the_tensors_its_step_closes_over():
    # the step's own device tensor (like a model buffer) has no other owner than the step; a
    # freed one would be overwritten below, and the replay would read the new values
    import gc
    import weakref

    def make_step():
        scale = torch.full((7, 5), 2.0, device="cuda")

        def step(p, s, g):
            return {"w": p["w"] * scale + g, "b": p["b"]}, s

        return step, weakref.ref(scale)

    step, alive = make_step()
    p = _tree("cuda")
    g = _tree("cuda", 1)["w"]
    want = step(_clone(p), (), g)[0]
    graphed = fo.cuda_graph(step, p, (), g)
    del step
    gc.collect()
    assert alive() is not None
    junk = torch.full((7, 5), -5.0, device="cuda")  # would take the block of a freed one
    got, _ = graphed(p, (), g)
    _assert_trees_equal(got, want)
    del junk


def test_warmup_copies_keep_strides_and_requires_grad():
    # a compiled step guards on both: copies that differ would compile it again in the capture
    from funcopt.flat import _warmup_copy

    base = torch.randn(4, 6)
    for x in (base, base[:, ::2], base.t(), torch.randn(3, requires_grad=True)):
        with torch.no_grad():
            y = _warmup_copy(x)
        assert y.stride() == x.stride() and y.requires_grad == x.requires_grad
        assert torch.equal(y.detach(), x.detach()) and y.data_ptr() != x.data_ptr()


def _flat_step(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(n, generator=g).cuda()
    grads = torch.randn(n, generator=g).cuda()
    tx = fo.adamw(1e-2, weight_decay=1e-2)
    return flat, grads, tx, _step(tx)


@cuda
def test_jit_graph_replays_the_compiled_steps_numbers():
    flat, grads, tx, step = _flat_step(1000)
    ref, ref_state = flat.clone(), tx.init(flat)
    plain = fo.jit(step, graph=False)
    fast, state = fo.jit(step), tx.init(flat)
    for i in range(6):  # 2 warm-up steps, the capture, 3 replays
        g = grads * (1 + i)
        ref, ref_state = plain(ref, ref_state, g)
        flat, state = fast(flat, state, g)
    torch.testing.assert_close(flat, ref, rtol=0, atol=0)
    _assert_trees_equal(state, ref_state)


@cuda
def test_jit_captures_a_graph_per_argument_shape():
    flat, _, tx, _ = _flat_step(10)
    x_full, x_last = torch.randn(8, 10, device="cuda"), torch.randn(3, 10, device="cuda")

    def step(p, s, x):
        grads = torch.func.grad(lambda f: ((x @ f) ** 2).mean())(p)
        u, s = tx.update(grads, s, p)
        return fo.apply_updates(p, u), s

    ref, ref_state = flat.clone(), tx.init(flat)
    fast, state = fo.jit(step), tx.init(flat)
    for x in [x_full] * 4 + [x_last] * 4 + [x_full, x_last]:
        ref, ref_state = step(ref, ref_state, x)
        flat, state = fast(flat, state, x)
    torch.testing.assert_close(flat, ref, rtol=1e-5, atol=1e-6)


@cuda
def test_jit_makes_no_copy_of_params_and_state():
    n = 1 << 22  # 16 MiB per buffer in float32
    flat, grads, tx, step = _flat_step(n)
    state = tx.init(flat)
    fast = fo.jit(step)
    flat, state = fast(flat, state, grads)  # compiles: the compiler's one-time buffers
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(5):  # the second warm-up step, the capture and replays
        flat, state = fast(flat, state, grads)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # fo.cuda_graph's warm-up copies params and state (3 buffers); a pure step allocates new
    # ones (3 more); the jitted step writes in place
    assert extra < 0.5 * flat.numel() * flat.element_size(), extra
