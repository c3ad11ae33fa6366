"""SINGD against the reference package ``singd`` (same structures, hyperparameters, seeds)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcopt as fo
from funcopt.testing import check_transform
from funcopt.transforms.natural_gradient.structures import STRUCTURES, BlockDiagonal

pytest.importorskip("singd")
from singd.optim.optimizer import SINGD  # noqa: E402
from singd.structures.blockdiagonal import Block3DiagonalMatrix  # noqa: E402
from singd.structures.hierarchical import Hierarchical3_2Matrix  # noqa: E402
from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix  # noqa: E402
from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix  # noqa: E402
from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix  # noqa: E402
from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is fastest, and the CI machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

EXTRA = {"block3diagonal": Block3DiagonalMatrix, "hierarchical3_2": Hierarchical3_2Matrix,
         "triltopleftdiag": TrilTopLeftDiagonalMatrix,
         "trilbottomrightdiag": TrilBottomRightDiagonalMatrix,
         "triutopleftdiag": TriuTopLeftDiagonalMatrix,
         "triubottomrightdiag": TriuBottomRightDiagonalMatrix}


class PackageBlockDiagonal(BlockDiagonal):
    """The package's block-diagonal matrix multiplies by ``K`` where its own definition (and
    ours) multiplies by ``K^T``; this reproduces it so the comparison isolates that."""

    def rmatmat(self, p, x):
        return self.matmul(p, x)

    def from_inner(self, p, x=None):
        if x is None:
            return p[0] @ p[0].transpose(1, 2), p[1] @ p[1].T
        return super().from_inner(p, x)


def ours(name):
    s = STRUCTURES[name]
    return PackageBlockDiagonal(s.block_dim) if isinstance(s, BlockDiagonal) else s


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 5))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 3))


def data(model, steps):
    gen = torch.Generator().manual_seed(1)
    shape = (16, 20) if isinstance(model[0], nn.Linear) else (16, 2, 6, 6)
    classes = model[-1].out_features
    return [(torch.randn(shape, generator=gen), torch.randint(0, classes, (16,), generator=gen))
            for _ in range(steps)]


HP = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-2, T=2,
          lr_cov=5e-2)


def run_package(model, batches, structure, **hp):
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, structures=(structure, structure), **hp)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def run_ours(model, batches, structure, **hp):
    hp = dict(hp)
    tx = fo.singd(model, learning_rate=hp.pop("lr"), momentum=hp.pop("momentum"),
                  weight_decay=hp.pop("weight_decay"), structures=(structure, structure), **hp)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for x, y in batches:
        cap = fo.func.capture_curvature(model, params, x, y)
        updates, state = tx.update(cap.grads, state, params, curvature=cap)
        params = fo.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_matches_the_package_over_20_steps(name, make, monkeypatch):
    if name in EXTRA:  # structures the package has but does not list by name
        monkeypatch.setitem(SINGD.SUPPORTED_STRUCTURES, name, EXTRA[name])
    model = make()
    batches = data(model, 20)
    ref = run_package(model, batches, name, **HP)
    got = run_ours(model, batches, ours(name), **HP)
    start = dict(model.named_parameters())
    for k in ref:
        assert not torch.allclose(ref[k], start[k])  # the run moved the parameters
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [dict(kfac_like=True, alpha1=0.0),
                                     dict(normalize_lr_cov=True),
                                     dict(lr_cov=lambda t: 1e-2 * (1 + t), T=1)],
                         ids=["kfac_like", "normalize", "schedule"])
def test_variants_match_the_package(options):
    model = mlp()
    batches = data(model, 8)
    hp = {**HP, **options}
    ref = run_package(model, batches, "dense", **hp)
    got = run_ours(model, batches, "dense", **{**hp, "alpha1": None}
                   if options.get("kfac_like") else hp)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_bf16_matches_the_package_in_bf16():
    model = mlp().to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in data(model, 5)]
    ref = run_package(model, batches, "diagonal", **HP)
    got = run_ours(model, batches, "diagonal", **HP)
    for k in ref:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=2e-2, atol=2e-2)


def test_float32_preconditioner_for_bf16_weights():
    model = mlp().to(torch.bfloat16)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = fo.scale_by_singd(model, preconditioner_dtype=(torch.float32, torch.float32), T=1)
    state = tx.init(params)
    assert all(t.dtype == torch.float32 for t in state.K["0"])
    x, y = data(model, 1)[0]
    cap = fo.func.capture_curvature(model, params, x.to(torch.bfloat16), y)
    upd, state = tx.update(cap.grads, state, params, curvature=cap)
    assert all(u.dtype == torch.bfloat16 and torch.isfinite(u).all() for u in upd.values())


@pytest.mark.parametrize("name", ["dense", "diagonal", "triltoeplitz", "hierarchical15_15"])
def test_contract(name):
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = data(model, 1)[0]
    cap = fo.func.capture_curvature(model, params, x, y)
    check_transform(fo.singd(model, 1e-2, structures=(name, name), T=2), params,
                    curvature=cap)


def test_zero_gradients_give_finite_updates_and_missing_curvature_is_an_error():
    model = mlp()
    params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    x = torch.zeros(4, 20)
    cap = fo.func.capture_curvature(model, params, x, torch.zeros(4, dtype=torch.long))
    tx = fo.scale_by_singd(model, T=1)
    state = tx.init(params)
    for _ in range(3):
        upd, state = tx.update(cap.grads, state, params, curvature=cap)
    assert all(torch.isfinite(u).all() for u in upd.values())
    with pytest.raises(ValueError, match="curvature="):
        tx.update(cap.grads, tx.init(params), params)


def test_unsupported_parameters_need_a_fallback():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"fallback=.*1\.weight|1\.weight.*fallback"):
        fo.singd(model)
    tx = fo.singd(model, 1e-2, fallback=fo.chain(fo.trace(0.9), fo.scale_by_learning_rate(0.1)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    cap = fo.func.capture_curvature(model, params, x, y)
    upd, _ = tx.update(cap.grads, tx.init(params), params, curvature=cap)
    torch.testing.assert_close(upd["1.weight"], -0.1 * cap.grads["1.weight"])
    assert set(cap.unsupported) == {"1"}


def test_bad_hyperparameters_are_named():
    model = mlp()
    with pytest.raises(ValueError, match="alpha1"):
        fo.scale_by_singd(model, kfac_like=True, alpha1=0.5)
    with pytest.raises(ValueError, match="structure"):
        fo.scale_by_singd(model, structures=("toeplitz", "dense"))
    with pytest.raises(ValueError, match="damping"):
        fo.scale_by_singd(model, damping=-1.0)
    with pytest.raises(ValueError, match="T="):
        fo.scale_by_singd(model, T=0)


def test_process_group_path_equals_single_process(tmp_path):
    """A one-process gloo group: the all-reduce path runs and changes nothing."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    group_was = dist.is_initialized()
    if not group_was:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = mlp()
        batches = data(model, 4)
        hp = dict(HP)
        plain = run_ours(model, batches, "dense", **hp)
        grouped = run_ours(model, batches, "dense", process_group=dist.group.WORLD, **hp)
        for k in plain:
            torch.testing.assert_close(grouped[k], plain[k])
    finally:
        if not group_was:
            dist.destroy_process_group()


@pytest.mark.parametrize("name", ["dense", "diagonal", "triltoeplitz"])
def test_gradient_accumulation_equals_the_concatenated_batch(name):
    """multi_steps over 2 micro-batches with merged curvature == one step on both (float64)."""
    model = cnn().double()
    batches = [(x.double(), y) for x, y in data(model, 4)]
    make = lambda: fo.singd(model, 0.05, structures=(name, name), T=2, lr_cov=5e-2)  # noqa
    acc = fo.multi_steps(make(), 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = acc.init(params)
    for x, y in batches:
        caps = []
        for rows in (slice(0, 8), slice(8, 16)):
            caps.append(fo.func.capture_curvature(model, params, x[rows], y[rows]))
            upd, state = acc.update(caps[-1].grads, state, params,
                                    curvature=fo.func.merge_curvature(caps))
            params = fo.apply_updates(params, upd)
    ref = run_ours(model, batches, name, lr=0.05, momentum=0.9, weight_decay=0.0, T=2,
                   lr_cov=5e-2)
    for k in ref:
        torch.testing.assert_close(params[k], ref[k], rtol=1e-9, atol=1e-11)
