"""fo.Optimizer on flat storage: element-wise transforms keep the parameters, gradients and
state of a group in buffers, with torch.optim's numbers and a model that sees no difference."""

import gc

import pytest
import torch

import funcopt as fo

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device, dtype)


def _data(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g).to(device, dtype), torch.randn(32, 3, generator=g).to(device, dtype)


def _train(model, opt, steps, accumulate=1, sched=None, device="cpu", dtype=torch.float32):
    x, y = _data(device, dtype)
    for _ in range(steps):
        opt.zero_grad()
        for k in range(accumulate):
            sl = slice(k * 32 // accumulate, (k + 1) * 32 // accumulate)
            torch.nn.functional.mse_loss(model(x[sl]), y[sl]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make_fo, make_torch", [
    (lambda: fo.adamw(1e-2, weight_decay=1e-2), lambda ps: torch.optim.AdamW(ps, 1e-2, weight_decay=1e-2)),
    (lambda: fo.sgd(1e-2, momentum=0.9, nesterov=True),
     lambda ps: torch.optim.SGD(ps, 1e-2, momentum=0.9, nesterov=True)),
    (lambda: fo.adam(1e-2, amsgrad=True), lambda ps: torch.optim.Adam(ps, 1e-2, amsgrad=True)),
    (lambda: fo.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.5),
     lambda ps: torch.optim.RMSprop(ps, 1e-2, alpha=0.99, eps=1e-8, momentum=0.5)),
])
def test_flat_group_matches_torch_optim(make_fo, make_torch):
    m1, m2 = _model(dtype=torch.float64), _model(dtype=torch.float64)
    opt = fo.Optimizer(m1.parameters(), make_fo())
    assert opt._flat[0] is not None  # the flat path runs
    got = _train(m1, opt, 15, accumulate=2, dtype=torch.float64)
    want = _train(m2, make_torch(list(m2.parameters())), 15, accumulate=2, dtype=torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_parameters_and_gradients_are_views_of_one_buffer():
    model = _model()
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    group = opt._flat[0]
    base = group.flat.data_ptr()
    end = base + group.flat.numel() * 4
    assert all(base <= p.data_ptr() < end for p in model.parameters())
    _train(model, opt, 2)
    gbase = group.grad_flat.data_ptr()
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(model.parameters(), group.grad_views))
    assert all(gbase <= p.grad.data_ptr() < gbase + group.grad_flat.numel() * 4 for p in model.parameters())
    mu = opt.transform_states[0][0].mu
    assert len(mu) == 1 and mu[0].shape == group.flat.shape  # one moment buffer


def test_tree_path_for_transforms_that_are_not_elementwise():
    for tx in (fo.adamw(1e-2, mask=lambda p: [True] * len(p)), fo.muon(0.02),
               fo.inject_hyperparams(fo.adamw)(learning_rate=1e-2), fo.adagrad_norm(0.1)):
        opt = fo.Optimizer(_model().parameters(), tx)
        assert opt._flat[0] is None
    assert fo.is_elementwise(fo.lion(1e-3)) and not fo.is_elementwise(fo.muon(0.02))
    with pytest.raises(TypeError, match="not a transform"):
        fo.elementwise(object())


def test_a_reassigned_parameter_is_taken_back_into_the_buffer():
    f64 = torch.float64
    m1, m2 = _model(dtype=f64), _model(dtype=f64)
    opt1 = fo.Optimizer(m1.parameters(), fo.adamw(1e-2, weight_decay=1e-2))  # torch's default
    opt2 = torch.optim.AdamW(m2.parameters(), 1e-2)
    _train(m1, opt1, 3, dtype=f64)
    _train(m2, opt2, 3, dtype=f64)
    with torch.no_grad():  # a user loads weights by assignment, as torch.optim allows
        for m in (m1, m2):
            m[0].weight.data = torch.full_like(m[0].weight, 0.1)
    got, want = _train(m1, opt1, 3, dtype=f64), _train(m2, opt2, 3, dtype=f64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert opt1._flat[0].views[0].data_ptr() == m1[0].weight.data_ptr()


def test_a_cast_model_is_refused_with_the_fix():
    model = _model()
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    model.double()
    x, y = _data(dtype=torch.float64)
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="parameter 0 now has shape .* dtype torch.float64.*after moving, casting"):
        opt.step()


def test_parameters_without_gradient_stay_and_others_move():
    model = _model()
    opt = fo.Optimizer(model.parameters(), fo.sgd(0.1))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    torch.nn.functional.mse_loss(model[0](x).sum(1, keepdim=True), y[:, :1]).backward()  # layer 0 only
    opt.step()
    after = list(model.parameters())
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    opt.zero_grad()
    opt.step()  # no gradient at all: nothing moves
    assert torch.equal(after[2], before[2])


def test_lr_scheduler_writes_the_learning_rate_the_step_uses():
    f64 = torch.float64
    m1, m2 = _model(dtype=f64), _model(dtype=f64)
    opt1 = fo.Optimizer(m1.parameters(), fo.adamw(1e-2, weight_decay=1e-2))  # torch's default
    opt2 = torch.optim.AdamW(m2.parameters(), 1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(opt1, 2, gamma=0.3)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, 2, gamma=0.3)
    for a, b in zip(_train(m1, opt1, 7, sched=s1, dtype=f64), _train(m2, opt2, 7, sched=s2, dtype=f64)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_continues_bit_for_bit():
    m1 = _model()
    opt1 = fo.Optimizer(m1.parameters(), fo.adamw(1e-2))
    _train(m1, opt1, 3)
    saved_model = {k: v.clone() for k, v in m1.state_dict().items()}
    saved = opt1.state_dict()
    want = _train(m1, opt1, 3)
    m2 = _model(seed=5)
    m2.load_state_dict(saved_model)
    opt2 = fo.Optimizer(m2.parameters(), fo.adamw(1e-2))
    opt2.load_state_dict(saved)
    for a, b in zip(_train(m2, opt2, 3), want):
        assert torch.equal(a, b)


def test_a_dropped_optimizer_leaves_no_hook_behind():
    model = _model()
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    _train(model, opt, 1)
    views = [v.data_ptr() for v in opt._flat[0].grad_views]
    del opt
    gc.collect()
    for p in model.parameters():
        p.grad = None
    x, y = _data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad.data_ptr() not in views for p in model.parameters())


@cuda
def test_cuda_adapter_compiles_captures_and_keeps_torch_fused_memory():
    """Peak memory over set-up and steps: parameters, gradients and state, as torch's fused
    AdamW, plus the one fresh gradient a hook moves into the buffer (at most the largest
    parameter) and the compiler's one-time work buffers."""

    def run(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.Tanh(),
                                    torch.nn.Linear(4096, 1024)).cuda()
        x, y = torch.randn(8, 512, device="cuda"), torch.randn(8, 1024, device="cuda")
        opt = make_opt(model.parameters())
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    def peak(make_opt):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run(make_opt)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    run(lambda ps: torch.optim.SGD(ps, 0.0))  # cuBLAS and the allocator's first blocks
    run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2)))  # Inductor's first use
    want, torch_peak = peak(lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True))
    got, fo_peak = peak(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    largest = 4096 * 1024 * 4
    assert fo_peak <= 1.05 * torch_peak + largest, (fo_peak, torch_peak)


def test_a_second_optimizer_over_the_same_model_resumes_the_first():
    """Rebuilding the optimizer in the same process (its parameters are now views of the first
    one's buffer) gives a flat group again, which loads the first one's state dict."""
    model = _model()
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    _train(model, opt, 2)
    opt2 = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    assert opt2._flat[0] is not None
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.transform_states[0][0].mu[0], opt.transform_states[0][0].mu[0])


def test_a_sparse_gradient_is_refused_with_a_clear_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fo.Optimizer(emb.parameters(), fo.sgd(0.1))
    emb(torch.tensor([1, 2])).sum().backward()  # the gradient hook leaves a sparse one alone
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
