"""Curvature capture: a^T g equals autograd's gradients; factors equal per-sample loops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from funcopt.func import (
    MonteCarloFisher,
    capture_curvature,
    kronecker_factors,
    merge_curvature,
    supported_layers,
)

DEFAULT_DTYPE = torch.float64  # float64 references (tests/conftest.py sets it per test)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is fastest, and the CI machine is shared."""
    n, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # float64 references
    yield
    torch.set_num_threads(n)
    torch.set_default_dtype(dtype)

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False), nn.ReLU(),
                         nn.Linear(3, 4))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(3, 4, 2, stride=2, bias=False), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5))


class SeqModel(nn.Module):
    """A Linear layer shared over a sequence dimension."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: (N, S, 4)
        return self.head(torch.tanh(self.proj(x)).mean(1))


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def autograd_grads(model, params, x, y):
    model = model.to(torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.func.functional_call(model, leaves, (x,))
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(leaves.values()))
    return dict(zip(leaves, grads))


CASES = [(mlp, (8, 5)), (cnn, (6, 2, 6, 6)), (SeqModel, (5, 7, 4))]


@pytest.mark.parametrize("make,shape", CASES, ids=["mlp", "cnn", "sequence"])
def test_a_transpose_g_is_the_gradient(make, shape):
    model = make()
    params = params_of(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, model[-1].out_features if isinstance(model, nn.Sequential) else 3,
                      (shape[0],), generator=torch.Generator().manual_seed(2))
    cap = capture_curvature(model, params, x, y)
    ref = autograd_grads(model, params, x, y)
    for k in ref:
        torch.testing.assert_close(cap.grads[k], ref[k])
    specs, _ = supported_layers(model, params)
    assert set(cap.layers) == set(specs)
    for name, spec in specs.items():
        lay = cap.layers[name]
        gw = lay.g.T @ lay.a                                  # (dim_out, dim_in)
        w = ref[spec.weight]
        if spec.bias is not None:
            torch.testing.assert_close(gw[:, -1], ref[spec.bias])
            gw = gw[:, :-1]
        torch.testing.assert_close(gw, w.reshape(w.shape[0], -1))
        assert lay.num_loss_terms == shape[0]


def patches_by_loop(x, k, stride, pad):
    """Conv patches of one sample (C, H, W) by explicit slicing: (positions, C*k*k)."""
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = []
    for i in range(0, xp.shape[1] - k + 1, stride):
        for j in range(0, xp.shape[2] - k + 1, stride):
            rows.append(xp[:, i:i + k, j:j + k].reshape(-1))
    return torch.stack(rows)


def test_cnn_factors_equal_per_sample_loops():
    """A = mean over samples and positions of a a^T; G = mean over samples of sum over
    positions of g g^T with per-sample loss gradients; computed here sample by sample."""
    model = cnn()
    params = params_of(model)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 4, 2])
    cap = capture_curvature(model, params, x, y)
    c1, c2, lin = model[0], model[2], model[4]
    sums = {n: [0.0, 0.0, 0] for n in ("0", "2", "4")}
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        z1 = F.conv2d(xn, c1.weight, c1.bias, padding=1).requires_grad_(True)
        h1 = torch.relu(z1)
        z2 = F.conv2d(h1, c2.weight, stride=2).requires_grad_(True)
        h2 = z2.flatten(1)
        z3 = (h2 @ lin.weight.T + lin.bias).requires_grad_(True)
        loss = F.cross_entropy(z3, y[n:n + 1])
        g1, g2, g3 = torch.autograd.grad(loss, [z1, z2, z3])
        inputs = {"0": (patches_by_loop(xn[0], 3, 1, 1), g1[0].flatten(1).T, True),
                  "2": (patches_by_loop(h1[0].detach(), 2, 2, 0), g2[0].flatten(1).T, False),
                  "4": (h2.detach(), g3, True)}
        for name, (a, g, bias) in inputs.items():
            if bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
            s = sums[name]
            s[0] = s[0] + a.T @ a
            s[1] = s[1] + g.T @ g
            s[2] += a.shape[0]
    for name, (aa, gg, rows) in sums.items():
        A, G = kronecker_factors(cap.layers[name])
        torch.testing.assert_close(A, aa / rows)
        torch.testing.assert_close(G, gg / x.shape[0])


def test_reduce_equals_expand_without_weight_sharing_and_averages_with_it():
    model = mlp()
    params = params_of(model)
    x, y = torch.randn(6, 5), torch.arange(6) % 4
    e = capture_curvature(model, params, x, y, kfac_approx="expand")
    r = capture_curvature(model, params, x, y, kfac_approx="reduce")
    for name in e.layers:
        torch.testing.assert_close(e.layers[name].a, r.layers[name].a)
        torch.testing.assert_close(e.layers[name].g, r.layers[name].g)
    seq = SeqModel()
    xs = torch.randn(3, 5, 4)
    es = capture_curvature(seq, params_of(seq), xs, torch.tensor([0, 1, 2]))
    rs = capture_curvature(seq, params_of(seq), xs, torch.tensor([0, 1, 2]), kfac_approx="reduce")
    a_e, g_e = es.layers["proj"].a.reshape(3, 5, -1), es.layers["proj"].g.reshape(3, 5, -1)
    torch.testing.assert_close(rs.layers["proj"].a, a_e.mean(1))
    torch.testing.assert_close(rs.layers["proj"].g, g_e.sum(1))
    rs2 = capture_curvature(seq, params_of(seq), xs, torch.tensor([0, 1, 2]),
                            loss_average="batch+sequence")
    assert rs2.layers["proj"].num_loss_terms == 15 and rs2.layers["head"].num_loss_terms == 3


def test_mc_fisher_converges_to_the_true_fisher_of_the_last_layer():
    """For softmax cross-entropy, E_y[G] of the output layer is mean_n (diag(p) - p p^T)."""
    model = mlp()
    params = params_of(model)
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(5, dtype=torch.long)
    gen = torch.Generator().manual_seed(5)
    reps = 800  # each example repeated: one MC draw per copy
    cap = capture_curvature(model, params, x.repeat(reps, 1), y.repeat(reps),
                            fisher=MonteCarloFisher(gen))
    G = kronecker_factors(cap.layers["4"])[1]
    p = torch.softmax(torch.func.functional_call(model, params, (x,)), -1)
    exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(G, exact, atol=0.03, rtol=0)
    emp = capture_curvature(model, params, x, y, fisher=MonteCarloFisher(gen))
    torch.testing.assert_close(emp.grads["0.weight"], autograd_grads(model, params, x, y)["0.weight"])


def test_mse_mc_fisher_is_finite_and_grads_exact():
    model = mlp()
    params = params_of(model)
    x, t = torch.randn(4, 5), torch.randn(4, 4)
    cap = capture_curvature(model, params, x, t, loss="mse", fisher="mc")
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, leaves, (x,)), t),
                              list(leaves.values()))
    for k, r in zip(leaves, ref):
        torch.testing.assert_close(cap.grads[k], r)
    assert all(torch.isfinite(lay.g).all() for lay in cap.layers.values())


def test_unsupported_layers_are_reported_and_strict_raises():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    params = params_of(model)
    x, y = torch.randn(3, 2, 6, 6), torch.tensor([0, 1, 2])
    cap = capture_curvature(model, params, x, y,
                            buffers={k: v for k, v in model.named_buffers()})
    assert set(cap.unsupported) == {"0", "1"} and set(cap.layers) == {"3"}
    assert set(cap.grads) == set(params)
    with pytest.raises(ValueError, match="groups=2"):
        capture_curvature(model, params, x, y, strict=True)


def test_zero_gradients_and_bad_options():
    model = mlp()
    params = {k: torch.zeros_like(v) for k, v in params_of(model).items()}
    cap = capture_curvature(model, params, torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert all(torch.isfinite(lay.g).all() and torch.isfinite(lay.a).all()
               for lay in cap.layers.values())
    x, y = torch.randn(2, 5), torch.tensor([0, 1])
    for kw, msg in [({"fisher": "true"}, "fisher"), ({"kfac_approx": "x"}, "kfac_approx"),
                    ({"loss": "hinge"}, "loss"), ({"loss_average": "mean"}, "loss_average"),
                    ({"loss": lambda o, t: o.sum(), "fisher": "mc"}, "likelihood")]:
        with pytest.raises(ValueError, match=msg):
            capture_curvature(model, params, x, y, **kw)


@pytest.mark.parametrize("loss_average", ["batch", None, "batch+sequence"])
@pytest.mark.parametrize("make, shape", CASES, ids=["mlp", "cnn", "sequence"])
def test_merged_micro_batches_equal_the_concatenated_batch(make, shape, loss_average):
    model = make().double()
    params = params_of(model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((9,) + shape[1:], generator=gen)
    y = torch.randint(0, 3, (9,), generator=gen)
    kw = dict(loss_average=loss_average)
    if loss_average is None:
        kw["loss"] = lambda out, t: F.cross_entropy(out, t, reduction="sum")
    whole = capture_curvature(model, params, x, y, **kw)
    parts = [capture_curvature(model, params, x[i:j], y[i:j], **kw)
             for i, j in ((0, 3), (3, 4), (4, 9))]  # unequal micro-batches
    merged = merge_curvature([merge_curvature(parts[:2], loss_average=loss_average), parts[2]],
                             loss_average=loss_average)
    torch.testing.assert_close(merged.loss, whole.loss)
    for k in whole.grads:
        torch.testing.assert_close(merged.grads[k], whole.grads[k])
    for name, lay in whole.layers.items():
        assert merged.layers[name].num_loss_terms == lay.num_loss_terms
        for got, ref in zip(kronecker_factors(merged.layers[name]), kronecker_factors(lay)):
            torch.testing.assert_close(got, ref)


def test_merge_refuses_bad_input():
    model = mlp().double()
    params = params_of(model)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    cap = capture_curvature(model, params, x, y)
    with pytest.raises(TypeError, match="Captured"):
        merge_curvature([])
    with pytest.raises(ValueError, match="loss_average"):
        merge_curvature([cap], loss_average="mean")
    part = {k: v for k, v in params.items() if not k.startswith("0.")}
    other = capture_curvature(model, {**params, **part}, x, y)._replace(
        layers={k: v for k, v in cap.layers.items() if k != "0"})
    with pytest.raises(ValueError, match="different layers"):
        merge_curvature([cap, other])


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_loss_scale_is_undone_exactly(fisher):
    """A power-of-two loss scale changes nothing after unscaling (float64)."""
    model = cnn().double()
    params = params_of(model)
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
    def fisher_of(seed):
        return MonteCarloFisher(torch.Generator().manual_seed(seed)) if fisher == "mc" else fisher

    ref = capture_curvature(model, params, x, y, fisher=fisher_of(0))
    got = capture_curvature(model, params, x, y, fisher=fisher_of(0), loss_scale=2.0 ** 12)
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=0)
    for k in ref.grads:
        torch.testing.assert_close(got.grads[k], ref.grads[k], rtol=1e-14, atol=0)
    for k in ref.layers:
        torch.testing.assert_close(got.layers[k].g, ref.layers[k].g, rtol=1e-14, atol=0)


def test_loss_scale_rescues_float16_autocast_from_underflow():
    """Under fp16 autocast a small loss underflows in the backward pass; scaling the loss
    and unscaling afterwards recovers float32 gradients and g (as torch.amp.GradScaler)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5)).float()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 20, dtype=torch.float32), torch.randint(0, 5, (16,))
    small = lambda out, t: F.cross_entropy(out.float(), t) * 2.0 ** -20  # noqa: E731
    ref = capture_curvature(model, params, x, y, loss=small)

    def rel_err(cap):
        errs = [(cap.grads[k].float() - ref.grads[k]).norm() / ref.grads[k].norm()
                for k in ref.grads]
        errs += [(cap.layers[k].g.float() - ref.layers[k].g).norm() / ref.layers[k].g.norm()
                 for k in ref.layers]
        return max(float(e) for e in errs)

    with torch.autocast("cpu", dtype=torch.float16):
        plain = capture_curvature(model, params, x, y, loss=small)
        scaled = capture_curvature(model, params, x, y, loss=small, loss_scale=2.0 ** 20)
    assert rel_err(plain) > 0.5  # underflow: the unscaled fp16 pass loses the gradients
    assert rel_err(scaled) < 5e-3
    assert all(lay.g.dtype == torch.float32 for lay in scaled.layers.values())
    assert all(scaled.grads[k].dtype == torch.float32 for k in params)


def test_monte_carlo_fisher_object_is_the_mc_option_and_refuses_a_bad_generator():
    model = mlp()
    params = params_of(model)
    x, y = torch.randn(6, 5), torch.arange(6) % 4
    torch.manual_seed(7)
    by_name = capture_curvature(model, params, x, y, fisher="mc")
    torch.manual_seed(7)
    by_object = capture_curvature(model, params, x, y, fisher=MonteCarloFisher())
    seeded = [capture_curvature(model, params, x, y,
                                fisher=MonteCarloFisher(torch.Generator().manual_seed(7)))
              for _ in range(2)]
    for name in by_name.layers:
        torch.testing.assert_close(by_object.layers[name].g, by_name.layers[name].g, rtol=0, atol=0)
        torch.testing.assert_close(seeded[0].layers[name].g, seeded[1].layers[name].g,
                                   rtol=0, atol=0)
    with pytest.raises(TypeError, match="MonteCarloFisher: generator"):
        MonteCarloFisher(generator=3)
    with pytest.raises(ValueError, match="fisher="):
        capture_curvature(model, params, x, y, fisher=None)
