"""Careless and adversarial use of the fast paths: ``fo.Optimizer`` on flat storage (an
element-wise transform keeps parameters, gradients and state in buffers) and ``fo.jit``.

Each test asserts the right behaviour: torch.optim's numbers (or the pure step's) in float64,
or one clear error naming the problem. Each case that once went wrong (a frozen, expanded or
aliased parameter, a reshaped parameter, a flat state loaded over other shapes, a jitted step
returning other shapes, dtypes or trees, later calls with unchecked trees, differentiation
through a jitted step, arguments of the wrong type) now has the behaviour its test asserts.

The ``fo.jit`` tests compile (on the CPU, seconds each), so they are few and tiny.
"""

import pytest
import torch

import funcopt as fo

F64 = torch.float64


def _tree_adamw(lr=1e-2, wd=1e-2):
    """AdamW on the list of parameters: a weight-decay mask turns the flat path off."""
    return fo.adamw(lr, weight_decay=wd, mask=lambda p: [True] * len(p))


def _linear(seed=0, n_in=3, n_out=2):
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out).to(F64)


def _x(n=4, d=3, seed=1):
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _close(got, want, rtol=1e-12, atol=1e-14):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _snap(params):
    return [p.detach().clone() for p in params]


# --------------------------------------------------------------------------- the adapter


def test_mixed_dtypes_in_one_group_match_the_tree_path_and_torch():
    """float32 + float64 + bfloat16 in one group: one buffer per dtype, the tree path's numbers
    bit for bit, and torch.optim.AdamW's for the float64 and float32 parameters."""
    dtypes = (torch.float32, F64, torch.bfloat16)

    def run(make):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, dtype=d)) for d in dtypes]
        opt = make(ps)
        for k in range(4):
            for p in ps:
                p.grad = (torch.linspace(-1, 1, 5, dtype=F64) * (k + 1) - 0.3).to(p.dtype)
            opt.step()
        return opt, _snap(ps)

    opt, flat = run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2)))
    assert opt._flat[0] is not None and len(opt._flat[0].flat) == 3  # one buffer per dtype
    _, tree = run(lambda ps: fo.Optimizer(ps, _tree_adamw()))
    for a, b in zip(flat, tree):
        assert a.dtype == b.dtype and torch.equal(a, b)
    _, ref = run(lambda ps: torch.optim.AdamW(ps, 1e-2, weight_decay=1e-2))
    torch.testing.assert_close(flat[1], ref[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat[0], ref[0], rtol=1e-6, atol=1e-7)


def test_a_weight_tied_in_two_layers_stays_tied_and_matches_torch():
    def run(make):
        torch.manual_seed(0)
        emb, head = torch.nn.Embedding(5, 4).to(F64), torch.nn.Linear(4, 5, bias=False).to(F64)
        head.weight = emb.weight  # tied by reference: model.parameters() lists it once
        model = torch.nn.ModuleDict({"emb": emb, "head": head})
        opt = make(list(model.parameters()))
        for _ in range(4):
            opt.zero_grad()
            head(emb(torch.tensor([0, 1, 3]))).pow(2).sum().backward()
            opt.step()
        assert head.weight is emb.weight
        return emb.weight.detach().clone()

    got = run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2)))
    torch.testing.assert_close(got, run(lambda ps: torch.optim.AdamW(ps, 1e-2)), rtol=1e-12, atol=1e-14)


def test_a_frozen_parameter_in_the_group_is_accepted_and_never_moves():
    def run(make):
        model = _linear()
        model.bias.requires_grad_(False)
        opt = make(model.parameters())
        for _ in range(3):
            opt.zero_grad()
            model(_x()).pow(2).sum().backward()
            opt.step()
        return _snap(model.parameters())

    got = run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2)))
    want = run(lambda ps: torch.optim.AdamW(ps, 1e-2))
    _close(got, want)
    assert torch.equal(got[1], _linear().bias.detach())


def test_a_non_contiguous_parameter_gives_torch_numbers():
    def run(make):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3, dtype=F64).t())  # strides (1, 3)
        opt = make([p])
        w = _x(3, 4)
        for _ in range(3):
            opt.zero_grad()
            (p * w).pow(2).sum().backward()
            opt.step()
        return [p.detach().clone()]

    got = run(lambda ps: fo.Optimizer(ps, fo.sgd(0.1, momentum=0.9)))
    _close(got, run(lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9)))


def test_an_expanded_parameter_is_refused_as_torch_optim_refuses_it():
    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, 1, dtype=F64).expand(3, 4))
        (p * torch.arange(12.0, dtype=F64).view(3, 4)).sum().backward()
        return p

    p = make()
    with pytest.raises(RuntimeError, match="memory location"):
        torch.optim.SGD([p], 0.1).step()
    p = make()
    with pytest.raises((RuntimeError, ValueError), match="memory|overlap|expand"):
        fo.Optimizer([p], fo.sgd(0.1)).step()


def test_zero_size_parameters_are_carried_and_the_others_match_torch():
    def run(make):
        empty = torch.nn.Parameter(torch.zeros(0, 3, dtype=F64))
        full = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=F64))
        opt = make([empty, full])
        for k in range(3):
            empty.grad = torch.zeros(0, 3, dtype=F64)
            full.grad = torch.linspace(0, 1, 4, dtype=F64) * (k + 1)
            opt.step()
        assert empty.shape == (0, 3)
        return [full.detach().clone()]

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(0.1, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 0.1)))


def test_a_parameter_viewing_another_parameters_storage_is_torch_numbers_or_refused():
    def run(make):
        base = torch.nn.Parameter(torch.zeros(4, dtype=F64))
        view = torch.nn.Parameter(base.data[:2])  # shares base's storage
        opt = make([base, view])
        base.grad, view.grad = torch.ones(4, dtype=F64), torch.ones(2, dtype=F64)
        opt.step()
        return [base.detach().clone(), view.detach().clone()]

    want = run(lambda ps: torch.optim.SGD(ps, 1.0))
    try:
        got = run(lambda ps: fo.Optimizer(ps, fo.sgd(1.0)))
    except (ValueError, RuntimeError) as e:
        assert "memory" in str(e) or "share" in str(e), e
        return
    _close(got, want)


def test_weights_loaded_in_place_or_by_assignment_after_building_give_torch_numbers():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        for k in range(5):
            opt.zero_grad()
            model(_x()).pow(2).sum().backward()
            opt.step()
            if k == 1:  # copy_ into the parameters (the flat views)
                model.load_state_dict({"weight": torch.ones(2, 3, dtype=F64), "bias": torch.zeros(2, dtype=F64)})
            if k == 2:  # new storage for one parameter
                model.weight.data = torch.full((2, 3), 0.5, dtype=F64)
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


def test_a_parameter_given_another_shape_is_torch_numbers_or_refused():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        model.bias.data = torch.zeros(1, dtype=F64)
        model(_x()).pow(2).sum().backward()
        opt.step()
        return _snap(model.parameters())

    want = run(lambda ps: torch.optim.SGD(ps, 0.1))
    try:
        got = run(lambda ps: fo.Optimizer(ps, fo.sgd(0.1)))
    except (ValueError, RuntimeError) as e:
        assert "shape" in str(e), e
        return
    assert [p.shape for p in got] == [p.shape for p in want]
    _close(got, want)


def test_clip_grad_norm_before_step_gives_torch_numbers():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        for _ in range(4):
            opt.zero_grad()
            (100 * model(_x()).pow(2).sum()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.sgd(0.1, momentum=0.9))),
           run(lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9)))


def test_grad_scaler_skips_the_inf_step_like_torch():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for k in range(5):
            opt.zero_grad()
            loss = model(_x()).pow(2).sum()
            if k == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return _snap(model.parameters()), scaler.get_scale()

    (got, got_scale), (want, want_scale) = (run(lambda ps: fo.Optimizer(ps, fo.adam(1e-2))),
                                            run(lambda ps: torch.optim.Adam(ps, 1e-2)))
    assert got_scale == want_scale == 2.0  # the inf step halved the scale
    _close(got, want)


def test_gradient_accumulation_with_zero_grad_to_zero_gives_torch_numbers():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        x = _x(6)
        for _ in range(4):
            opt.zero_grad(set_to_none=False)
            for j in range(3):
                model(x[2 * j:2 * j + 2]).pow(2).sum().backward()
            opt.step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


def test_a_step_with_no_gradients_moves_nothing_and_does_not_advance_the_state():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        for k in range(5):
            opt.zero_grad()
            if k != 2:  # step 2 has no gradient at all
                model(_x()).pow(2).sum().backward()
            opt.step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


def test_add_param_group_after_construction_gives_torch_numbers():
    def run(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)).to(F64)
        opt = make(model[0].parameters())
        for k in range(4):
            if k == 1:
                opt.add_param_group({"params": list(model[1].parameters()), "lr": 0.05})
            opt.zero_grad()
            model(_x()).pow(2).sum().backward()
            opt.step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


def test_two_optimizers_over_one_model_give_torch_numbers():
    """Each re-points ``p.data`` to its own buffer; both must still see and move the model."""

    def run(make):
        model = _linear()
        opts = [make(model.parameters()), make(model.parameters())]
        for k in range(4):
            for o in opts:
                o.zero_grad()
            model(_x()).pow(2).sum().backward()
            opts[k % 2].step()
            opts[1 - k % 2].step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


def test_state_dict_round_trip_of_a_mixed_dtype_group_continues_bit_for_bit():
    def make(seed):
        torch.manual_seed(seed)
        return [torch.nn.Parameter(torch.randn(3, dtype=d)) for d in (torch.float32, F64)]

    def steps(ps, opt, n):
        for k in range(n):
            for p in ps:
                p.grad = torch.linspace(-1, 1, 3, dtype=p.dtype) * (k + 2)
            opt.step()
        return _snap(ps)

    a = make(0)
    opt_a = fo.Optimizer(a, fo.adamw(1e-2))
    steps(a, opt_a, 2)
    saved, weights = opt_a.state_dict(), _snap(a)
    want = steps(a, opt_a, 3)
    b = make(7)
    with torch.no_grad():
        for p, w in zip(b, weights):
            p.copy_(w)
    opt_b = fo.Optimizer(b, fo.adamw(1e-2))
    opt_b.load_state_dict(saved)
    for x, y in zip(steps(b, opt_b, 3), want):
        assert torch.equal(x, y)


def test_a_tree_state_into_a_flat_optimizer_and_back_is_a_value_error():
    model = _linear()
    tree = fo.Optimizer(model.parameters(), _tree_adamw())
    model(_x()).pow(2).sum().backward()
    tree.step()
    flat = fo.Optimizer(_linear().parameters(), fo.adamw(1e-2, weight_decay=1e-2))
    assert tree._flat[0] is None and flat._flat[0] is not None
    with pytest.raises(ValueError, match="does not match"):
        flat.load_state_dict(tree.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        tree.load_state_dict(flat.state_dict())


def test_a_flat_state_into_parameters_of_other_shapes_is_a_value_error():
    def build(shapes):
        ps = [torch.nn.Parameter(torch.zeros(s, dtype=F64)) for s in shapes]
        return ps, fo.Optimizer(ps, fo.adamw(1e-2))

    ps, opt = build([(3,), (2,)])
    ps[0].grad, ps[1].grad = torch.ones(3, dtype=F64), 2 * torch.ones(2, dtype=F64)
    opt.step()
    def tree(shapes):
        return fo.Optimizer([torch.nn.Parameter(torch.zeros(s, dtype=F64)) for s in shapes], _tree_adamw())

    with pytest.raises(ValueError):  # the tree path checks shapes
        tree([(2,), (3,)]).load_state_dict(tree([(3,), (2,)]).state_dict())
    _, other = build([(2,), (3,)])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kind", ["step", "onecycle"])
def test_lr_schedulers_give_torch_numbers(kind):
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        if kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=7, cycle_momentum=False)
        for _ in range(7):
            opt.zero_grad()
            model(_x()).pow(2).sum().backward()
            opt.step()
            sched.step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_lr_written_into_param_groups_directly_gives_torch_numbers(as_tensor):
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        for k in range(5):
            lr = 0.01 * (k + 1) if k != 3 else 0.02  # a repeated value too
            opt.param_groups[0]["lr"] = torch.tensor(lr, dtype=F64) if as_tensor else lr
            opt.zero_grad()
            model(_x()).pow(2).sum().backward()
            opt.step()
        return _snap(model.parameters())

    _close(run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
           run(lambda ps: torch.optim.AdamW(ps, 1e-2)))


def test_a_closure_step_gives_torch_numbers_and_returns_the_loss():
    def run(make):
        model = _linear()
        opt = make(model.parameters())
        losses = []

        def closure():
            opt.zero_grad()
            loss = model(_x()).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(4):
            losses.append(float(opt.step(closure).detach()))
        return _snap(model.parameters()), losses

    (got, got_l), (want, want_l) = (run(lambda ps: fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=1e-2))),
                                    run(lambda ps: torch.optim.AdamW(ps, 1e-2)))
    _close(got, want)
    assert got_l == pytest.approx(want_l, rel=1e-12)


def test_step_keywords_reach_an_elementwise_transform_on_the_flat_path():
    """An extra keyword (``value``) is given to ``update`` on the flat buffers; an element-wise
    transform that ignores it gives the numbers of a step without it."""

    def run(extra):
        model = _linear()
        opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2, weight_decay=1e-2))
        for _ in range(3):
            opt.zero_grad()
            loss = model(_x()).pow(2).sum()
            loss.backward()
            opt.step(**({"value": loss.detach()} if extra else {}))
        return _snap(model.parameters())

    _close(run(True), run(False), rtol=0, atol=0)


def test_a_transform_wrongly_marked_elementwise_runs_on_the_whole_buffer():
    """``fo.elementwise`` is the caller's promise. A per-leaf trust ratio marked element-wise
    runs on the one flat buffer: no crash, finite numbers, and the trust ratio of the whole
    buffer (not of each leaf), which is what the mark asks for."""
    model = _linear()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    tx = fo.elementwise(fo.chain(fo.scale_by_trust_ratio(), fo.scale(-0.1)))
    opt = fo.Optimizer(model.parameters(), tx)
    assert opt._flat[0] is not None
    model(_x()).pow(2).sum().backward()
    grad = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.isfinite(after).all()
    want = before - 0.1 * grad * before.norm() / grad.norm()
    torch.testing.assert_close(after, want, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- fo.jit


_TX = fo.adamw(0.1, weight_decay=0.01)


def _pure(p, s, g):
    u, s = _TX.update(g, s, p)
    return fo.apply_updates(p, u), s


def _leaves_close(got, want):
    for a, b in zip(fo.tree_leaves(got), fo.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_jit_matches_the_pure_step_through_nan_grads_new_batch_sizes_numbers_and_old_trees():
    """One jitted step, called with NaN and inf in the gradients, with batch sizes and Python
    number arguments that change (the CPU recompiles), and with a copy of pre-step trees
    passed back: every result is the pure step's, NaN where it has NaN."""
    g = torch.Generator().manual_seed(0)

    def step(p, s, x, y, scale):
        grad = torch.func.grad(lambda q: ((x @ q - y) ** 2).mean() * scale)(p)
        grad = torch.where(x[0] > 5, grad * float("nan"), grad)  # NaN where the data says so
        u, s = _TX.update(grad, s, p)
        return fo.apply_updates(p, u), s

    fast = fo.jit(step)
    w = torch.randn(3, dtype=F64, generator=g)
    p, s = w.clone(), _TX.init(w)
    rp, rs = w.clone(), _TX.init(w)
    saved = None
    for k, (n, scale) in enumerate(((8, 1.0), (8, 2.0), (5, 0.5), (8, 1.0))):
        x, y = torch.randn(n, 3, dtype=F64, generator=g), torch.randn(n, dtype=F64, generator=g)
        if k == 3:
            x[0, 1] = 6.0  # a NaN gradient for parameter 1
            saved = (p.clone(), fo.tree_map(torch.clone, s), x, y)
        p2, s2 = fast(p, s, x, y, scale)
        assert p2 is p and s2 is s  # donated: the inputs, overwritten
        rp, rs = step(rp, rs, x, y, scale)
        _leaves_close((p, s), (rp, rs))
    assert torch.isnan(p[1]) and torch.isfinite(p[[0, 2]]).all()
    old_p, old_s, x, y = saved  # pre-step trees (copies) passed back in
    got = fast(old_p, old_s, x, y, 1.0)
    _leaves_close(got, (rp, rs))


def test_jit_refuses_a_step_returning_another_shape():
    p = torch.zeros(4, dtype=F64)

    def step(p, s, g):
        new_p, s = _pure(p, s, g)
        return new_p[:1], s

    with pytest.raises(ValueError, match="result 0"):
        fo.jit(step)(p, _TX.init(p), torch.linspace(-1, 1, 4, dtype=F64))


def test_jit_refuses_a_step_returning_another_dtype():
    p = torch.zeros(4, dtype=F64)

    def step(p, s, g):
        new_p, s = _pure(p, s, g)
        return new_p.float(), s

    with pytest.raises(ValueError, match="result 0"):
        fo.jit(step)(p, _TX.init(p), torch.linspace(-1, 1, 4, dtype=F64))


def test_jit_refuses_a_step_returning_another_tree_structure_with_a_value_error():
    p = torch.zeros(4, dtype=F64)

    def step(p, s, g):
        new_p, s = _pure(p, s, g)
        return [new_p, new_p], s  # two leaves for one

    with pytest.raises(ValueError, match="tree structure"):
        fo.jit(step)(p, _TX.init(p), torch.ones(4, dtype=F64))


def test_jit_checks_every_call_not_only_the_first():
    grad = torch.linspace(0, 1, 6, dtype=F64)
    p = torch.linspace(-1, 1, 6, dtype=F64)
    fast = fo.jit(_pure)
    fast(p, _TX.init(p), grad)
    q = torch.linspace(-1, 1, 6, dtype=F64)
    first = _TX.init(q)
    shared = (first[0]._replace(mu=[q]), *first[1:])  # the first moment is the params' memory
    with pytest.raises(ValueError, match="share memory"):
        fast(q, shared, grad)
    with pytest.raises(TypeError, match="leaf"):
        fast(q, (first[0]._replace(count=3), *first[1:]), grad)


def test_jit_refuses_to_be_differentiated_with_a_clear_error():
    s = _TX.init(torch.zeros(6, dtype=F64))
    grad = torch.linspace(0, 1, 6, dtype=F64)
    with pytest.raises(ValueError, match="autograd"):
        torch.func.grad(lambda q: fo.jit(_pure)(q, s, grad)[0].sum())(torch.linspace(-1, 1, 6, dtype=F64))
    leaf = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
    with pytest.raises(ValueError, match="autograd"):
        fo.jit(_pure)(leaf, s, grad)


@pytest.mark.parametrize("kwargs", [{"graph": 0}, {"graph": 1}, {"warmup": "2"}, {"warmup": 2.5},
                                    {"warmup": True}, {"warmup": None}])
def test_jit_refuses_arguments_of_the_wrong_type_naming_them(kwargs):
    (name,) = kwargs
    with pytest.raises(TypeError, match=name):
        fo.jit(_pure, **kwargs)


def test_jit_refuses_bad_leaves_before_any_work():
    p = torch.linspace(-1, 1, 4, dtype=F64)
    s = _TX.init(p)
    with pytest.raises(ValueError, match="share memory"):  # two state leaves alias each other
        fo.jit(_pure)(p.clone(), (s[0]._replace(nu=s[0].mu), *s[1:]), torch.ones(4, dtype=F64))
    with pytest.raises(TypeError, match="leaf 1 .* float"):
        fo.jit(lambda p, s: (p, s))(p, {"count": 3.0})
    assert torch.equal(p, torch.linspace(-1, 1, 4, dtype=F64))
