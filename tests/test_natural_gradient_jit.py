"""A whole natural-gradient training step under ``fo.jit``: ``capture_curvature`` traces with
``torch.compile(fullgraph=True)`` and gives the eager capture's numbers, and a jitted step
(capture, SINGD/KFAC update, apply) gives the eager step's numbers (float64, fixed seeds).
The ``refresh`` keyword of the updates decides a refresh on the host and equals the every-T
schedule when it follows it.

Most compile checks use the ``aot_eager`` backend (Dynamo and AOT tracing decide graph breaks,
without Inductor's slow C++ build on a CPU); one test runs ``fo.jit`` with Inductor.
"""

import functools

import optree
import pytest
import torch
from torch import nn

import funcopt as fo


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


class Twice(nn.Module):
    """One Linear called twice (two blocks of rows) and a conv layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x).flatten(1)[:, :8]
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(h)))))


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_trees_close(got, want, rtol=1e-10, atol=1e-12):
    g, w = optree.tree_leaves(got), optree.tree_leaves(want)
    assert len(g) == len(w)
    for a, b in zip(g, w):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        else:
            assert a == b


CAPTURES = {
    "default": (mlp, {}),
    "loss_scale": (mlp, {"loss_scale": 8.0}),
    "reduce_mse": (mlp, {"kfac_approx": "reduce", "loss": "mse", "loss_average": None}),
    "twice_conv": (lambda: Twice().double(), {}),
}


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_capture_traces_fullgraph_and_matches_eager(name):
    make, options = CAPTURES[name]
    model = make()
    params = params_of(model)
    x, y = data()
    if name == "twice_conv":
        x = torch.randn(12, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if options.get("loss") == "mse":
        y = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def capture(p, x, y):
        return fo.func.capture_curvature(model, p, x, y, **options)

    want = capture(params, x, y)
    got = torch.compile(capture, fullgraph=True, backend="aot_eager")(params, x, y)
    assert set(got.layers) == set(want.layers)
    if name == "twice_conv":
        assert got.layers["lin"].a.shape[0] == 24  # one block of rows per call
    assert_trees_close(got, want)


def make_step(model, tx):
    def step(params, state, x, y, refresh=None):
        cap = fo.func.capture_curvature(model, params, x, y)
        extra = {} if refresh is None else {"refresh": refresh}
        updates, state = tx.update(cap.grads, state, params, curvature=cap, **extra)
        return fo.apply_updates(params, updates), state
    return step


TRANSFORMS = {
    "singd_dense": lambda m: fo.singd(m, 0.05, T=1),
    "singd_diagonal": lambda m: fo.singd(m, 0.05, T=1, structures=("diagonal", "diagonal")),
    "singd_T3": lambda m: fo.singd(m, 0.05, T=3, structures=("dense", "diagonal")),
    "kfac_T3": lambda m: fo.kfac(m, 0.05, momentum=0.9, T=3),
}


def run_steps(step, params, state, n, T, refresh):
    x, y = data()
    for i in range(n):
        params, state = step(params, state, x, y, (i % T == 0) if refresh else None)
    return params, state


@pytest.mark.parametrize("name,refresh", [("singd_dense", False), ("singd_diagonal", False),
                                          ("singd_T3", False), ("singd_T3", True),
                                          ("kfac_T3", False), ("kfac_T3", True)])
def test_jitted_step_matches_the_eager_step(name, refresh, monkeypatch):
    """fo.jit (compiled fullgraph, donated) of the whole step against the eager step, with
    the refresh decided by the transform (on the device while traced) or passed in."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = mlp()
    tx = TRANSFORMS[name](model)
    T = 3 if name.endswith("T3") else 1
    params = params_of(model)
    state = tx.init(params)
    step = make_step(model, tx)
    want = run_steps(step, params, state, 5, T, refresh=False)
    fast = fo.jit(step)
    copy = functools.partial(optree.tree_map, torch.clone)
    got = run_steps(fast, copy(params), copy(state), 5, T, refresh)
    assert_trees_close(got, want)


def test_jit_with_inductor_matches_eager():
    """The real fo.jit (Inductor) of a SINGD step: the eager numbers up to rounding."""
    model = mlp()
    tx = fo.singd(model, 0.05, T=1)
    params = params_of(model)
    state = tx.init(params)
    step = make_step(model, tx)
    want = run_steps(step, params, state, 3, 1, refresh=False)
    copy = functools.partial(optree.tree_map, torch.clone)
    got = run_steps(fo.jit(step), copy(params), copy(state), 3, 1, refresh=False)
    assert_trees_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("make", [lambda m: fo.scale_by_singd(m, T=3),
                                  lambda m: fo.scale_by_kfac(m, T=3)])
def test_refresh_keyword_overrides_the_schedule(make):
    """refresh following the schedule gives the schedule's numbers; refresh=False on a due
    step keeps the preconditioner; refresh=True off schedule refreshes it."""
    model = mlp()
    tx = make(model)
    params = params_of(model)
    state0 = tx.init(params)
    x, y = data()
    cap = fo.func.capture_curvature(model, params, x, y)
    due, _ = tx.update(cap.grads, state0, params, curvature=cap)
    same, _ = tx.update(cap.grads, state0, params, curvature=cap, refresh=True)
    assert_trees_close(same, due, rtol=0, atol=0)
    kept, s1 = tx.update(cap.grads, state0, params, curvature=cap, refresh=False)
    assert_trees_close(s1[1:3], state0[1:3], rtol=0, atol=0)  # preconditioner untouched
    assert any(not torch.equal(kept[k], due[k]) for k in due)
    _, plain = tx.update(cap.grads, s1, params, curvature=cap)       # count 1: not due
    _, forced = tx.update(cap.grads, s1, params, curvature=cap, refresh=True)
    assert_trees_close(plain[1:3], s1[1:3], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in
               zip(optree.tree_leaves(forced[1:3]), optree.tree_leaves(s1[1:3])))


@pytest.mark.parametrize("make", [fo.scale_by_singd, fo.scale_by_kfac])
def test_refresh_must_be_a_bool(make):
    model = mlp()
    tx = make(model)
    params = params_of(model)
    x, y = data()
    cap = fo.func.capture_curvature(model, params, x, y)
    with pytest.raises(TypeError, match="refresh="):
        tx.update(cap.grads, tx.init(params), params, curvature=cap, refresh=1)


def test_compiled_capture_refuses_layers_that_share_a_weight():
    """Two Linear layers with one weight tensor: the compiled capture finds layers by their
    weight, cannot tell the two apart, and says so instead of mixing their calls up."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4).double()
    b.weight = a.weight
    model = torch.nn.Sequential(a, torch.nn.Tanh(), b)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    assert "0" in fo.func.capture_curvature(model, params, x, y).layers
    with pytest.raises(Exception, match="share one weight tensor|params has no"):
        torch.compile(lambda p: fo.func.capture_curvature(model, p, x, y), fullgraph=True,
                      backend="aot_eager")(params)
