"""fo.Optimizer's flat groups keep a large parameter (at least 1/16 of the group and 2**22
elements) as its own leaf: its ``p.grad`` is autograd's tensor, never copied into the gradient
buffer, so the peak memory is torch fused AdamW's; the numbers stay torch.optim's."""

import copy

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import funcopt as fo
from funcopt.optim_flat import OWN_MIN_ELEMENTS, own_leaves

VOCAB, DIM = 4096, 1024  # 2**22 elements: the smallest large parameter


class Net(torch.nn.Module):
    """A large embedding, small layers, and one layer the loss never uses (no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.lin = torch.nn.Linear(DIM, 16)
        self.unused = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(self.emb(idx))))


def _net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (32,), generator=g) for _ in range(n)]


def _train(model, opt, steps=4, accumulate=2, sched=None):
    batches = iter(_batches(steps * accumulate))
    for k in range(steps):
        opt.zero_grad(set_to_none=k % 2 == 0)
        for _ in range(accumulate):
            model(next(batches)).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


def test_the_rule_depends_on_shapes_only():
    assert OWN_MIN_ELEMENTS == 2**22
    assert own_leaves([2**22, 2**22 * 15]) == [True, True]  # 1/16 of the group: its own leaf
    assert own_leaves([2**22, 2**22 * 15 + 1]) == [False, True]  # under 1/16
    assert own_leaves([2**22 - 1, 10]) == [False, False]  # under 2**22: in the buffer
    assert own_leaves([2**22, 2**22, 5]) == [True, True, False]


def test_the_large_gradient_is_autograds_and_never_copied():
    model = _net()
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    group = opt._flat[0]
    assert [i for i, _ in group.own] == [0]  # the embedding
    _train(model, opt, steps=2)
    opt.zero_grad()
    nbytes = VOCAB * DIM * 4
    with _Tracker() as seen:
        model(_batches(1)[0]).pow(2).mean().backward()
        g = model.emb.weight.grad
        opt.step()
    lo, hi = group.grad_flat.data_ptr(), group.grad_flat.data_ptr() + group.grad_flat.numel() * 4
    assert not lo <= g.untyped_storage().data_ptr() < hi  # not a view of the buffer
    assert g.untyped_storage().nbytes() == nbytes and model.emb.weight.grad is g
    # one tensor of its size is made (autograd's gradient, kept as p.grad), none is copied:
    # the hook copied it into the gradient buffer before (a copy_ of its size)
    assert seen.new_sizes.count(nbytes) == 1
    assert [n for n in seen.copied if n >= nbytes] == []
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(model.parameters(), group.grad_views)
               if v is not None and p.grad is not None)  # the small ones are views of the buffer
    assert model.unused.weight.grad is None


@pytest.mark.parametrize("fused", [True, False])
def test_numbers_are_torch_adamws_with_accumulation_and_a_parameter_without_gradient(fused):
    f64 = torch.float64
    m1, m2 = _net(f64), _net(f64)
    opt = fo.Optimizer(m1.parameters(), fo.adamw(1e-2, weight_decay=1e-2))
    assert len(opt._flat[0].own) == 1
    kw = {"fused": True} if fused else {"foreach": True}
    before = m1.unused.weight.detach().clone()
    got = _train(m1, opt, steps=5, accumulate=3)
    want = _train(m2, torch.optim.AdamW(m2.parameters(), 1e-2, weight_decay=1e-2, **kw), 5, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(m1.unused.weight, before)


def test_an_eager_transform_and_sgd_match_torch():
    f64 = torch.float64
    for make, make_torch in [
        (lambda: fo.sgd(1e-2, momentum=0.9, nesterov=True),
         lambda ps: torch.optim.SGD(ps, 1e-2, momentum=0.9, nesterov=True)),
        (lambda: fo.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False),
         lambda ps: torch.optim.RMSprop(ps, 1e-2, alpha=0.99, eps=1e-8)),
    ]:
        m1, m2 = _net(f64), _net(f64)
        opt = fo.Optimizer(m1.parameters(), make())
        assert len(opt._flat[0].own) == 1
        for a, b in zip(_train(m1, opt, 3), _train(m2, make_torch(list(m2.parameters())), 3)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_continues_bit_for_bit():
    m1 = _net()
    opt1 = fo.Optimizer(m1.parameters(), fo.adamw(1e-2))
    _train(m1, opt1, 2)
    saved_model = copy.deepcopy(m1.state_dict())
    saved = opt1.state_dict()
    mu = opt1.transform_states[0][0].mu
    assert [tuple(x.shape) for x in fo.tree_leaves(mu)][1:] == [(VOCAB, DIM)]  # a leaf of its own
    want = _train(m1, opt1, 2)
    m2 = _net()
    m2.load_state_dict(saved_model)
    opt2 = fo.Optimizer(m2.parameters(), fo.adamw(1e-2))
    opt2.load_state_dict(saved)
    for a, b in zip(_train(m2, opt2, 2), want):
        assert torch.equal(a, b)


def test_a_scheduler_changes_the_learning_rate_the_step_uses():
    f64 = torch.float64
    m1, m2 = _net(f64), _net(f64)
    opt1 = fo.Optimizer(m1.parameters(), fo.adamw(1e-2, weight_decay=1e-2))
    opt2 = torch.optim.AdamW(m2.parameters(), 1e-2, fused=True)
    s1 = torch.optim.lr_scheduler.StepLR(opt1, 1, gamma=0.3)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.3)
    for a, b in zip(_train(m1, opt1, 4, sched=s1), _train(m2, opt2, 4, sched=s2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_reassigned_large_parameter_is_taken_back_and_swaps_are_safe():
    f64 = torch.float64
    m1, m2 = _net(f64), _net(f64)
    opt1 = fo.Optimizer(m1.parameters(), fo.adamw(1e-2, weight_decay=1e-2))
    opt2 = torch.optim.AdamW(m2.parameters(), 1e-2)
    _train(m1, opt1, 2)
    _train(m2, opt2, 2)
    with torch.no_grad():
        for m in (m1, m2):
            m.emb.weight.data = torch.full_like(m.emb.weight, 0.1)
    for a, b in zip(_train(m1, opt1, 2), _train(m2, opt2, 2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert m1.emb.weight.data_ptr() == opt1._flat[0].views[0].data_ptr()


def test_zero_grad_without_set_to_none_keeps_autograds_tensor():
    model = _net()
    opt = fo.Optimizer(model.parameters(), fo.sgd(0.1))
    _train(model, opt, 1, accumulate=1)
    g = model.emb.weight.grad
    opt.zero_grad(set_to_none=False)
    assert model.emb.weight.grad is g and not g.any()
    opt.zero_grad()
    assert model.emb.weight.grad is None


def test_peak_live_bytes_are_torch_fuseds():
    """Live bytes over a training step (forward, backward, step): the optimizer's persistent
    tensors (gradient buffer, state) plus the peak of the tensors made during the step."""

    def footprint(make):
        model = _net()
        opt = make(model.parameters())
        _train(model, opt, 2, accumulate=1)
        opt.zero_grad()
        with _Tracker() as seen:
            model(_batches(1)[0]).pow(2).mean().backward()
            opt.step()
        keep = [t for t in fo.tree_leaves(getattr(opt, "transform_states", []))]
        keep += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        flat = getattr(opt, "_flat", [None])[0]
        if flat is not None:
            keep += fo.tree_leaves(flat.grad_flat)
        return _bytes(keep) + seen.peak

    torch_peak = footprint(lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True))
    fo_peak = footprint(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2)))
    largest_small = DIM * 16 * 4  # the one fresh gradient a hook copies (self.lin's weight)
    assert fo_peak <= torch_peak + largest_small, (fo_peak, torch_peak)


def _bytes(tensors) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


class _Tracker(TorchDispatchMode):
    """Records the storages that ops create (their sizes, ``new_sizes``), the peak of their
    live bytes (``peak``), and the sizes of ``copy_`` sources (``copied``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.new_sizes: list[int] = []
        self.copied: list[int] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in fo.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        if func is torch.ops.aten.copy_.default:
            self.copied.append(args[1].untyped_storage().nbytes())
        for t in fo.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() not in inputs and st.data_ptr() not in self.live:
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
                    self.new_sizes.append(st.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_a_state_dict_of_the_one_buffer_layout_names_the_cause(monkeypatch):
    """A group's state written when every parameter was inside the one flat buffer (before
    large parameters became their own leaves) does not fit today's layout: the error says so
    and what to do, not only that the trees differ."""
    import funcopt.optim_flat as optim_flat

    monkeypatch.setattr(optim_flat, "own_leaves", lambda numels: [False] * len(numels))
    old = fo.Optimizer(_net().parameters(), fo.adamw(1e-2))
    saved = old.state_dict()
    monkeypatch.undo()
    new = fo.Optimizer(_net().parameters(), fo.adamw(1e-2))
    with pytest.raises(ValueError, match="own leaves of the state.*restart the optimizer state"):
        new.load_state_dict(saved)


def test_a_large_cpu_group_without_a_torch_kernel_runs_on_the_list():
    """Lion has no torch kernel: over more than CPU_PURE_FLAT_BYTES of small parameters the
    adapter steps the list (the pure step's temporaries of one large buffer would be fresh
    memory maps every step), with the pure step's numbers; a small group, or SGD (torch's
    fused kernel, in place), keeps the flat path."""
    from funcopt.optim_flat import CPU_PURE_FLAT_BYTES

    g = torch.Generator().manual_seed(0)
    n = CPU_PURE_FLAT_BYTES // 8 // 40 + 1  # 40 float64 parameters, none its own leaf
    ps = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64)) for _ in range(40)]
    assert fo.Optimizer(ps, fo.lion(1e-3))._flat[0] is None
    assert fo.Optimizer(ps, fo.sgd(1e-3, momentum=0.9))._flat[0] is not None
    assert fo.Optimizer(ps[:2], fo.lion(1e-3))._flat[0] is not None
    before = {str(i): p.detach().clone() for i, p in enumerate(ps)}
    grads = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in before}
    opt = fo.Optimizer(ps, fo.lion(1e-3))
    for i, p in enumerate(ps):
        p.grad = grads[str(i)].clone()
    opt.step()
    tx = fo.lion(1e-3)
    u, _ = tx.update(grads, tx.init(before), before)
    want = fo.apply_updates(before, u)
    for i, p in enumerate(ps):
        assert torch.equal(p.detach(), want[str(i)])
