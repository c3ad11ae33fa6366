"""Adversarial findings of 2026-12-06: corrupted optimizer state_dicts, learning-rate schedules
returning what no step can use, corrupted benchmark reports given to ``--merge``, and
least-squares successes at points that are not minima."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import funcopt as fo
from funcopt.bench.__main__ import main as bench_main
from funcopt.checkpoint import tree_from_state_dict, tree_to_state_dict

F64 = torch.float64


# ----------------------------------------------------------------------------- fo.Optimizer


def _trained(n_big: int = 0):
    torch.manual_seed(0)
    shapes = [(10, 3), (4,)] + ([(n_big,)] if n_big else [])
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = fo.Optimizer(ps, fo.adamw(1e-2, weight_decay=0.1))
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    return ps, opt


def _corrupt_leaves(edit):
    def apply(sd):
        edit(sd["state"][0])
    return apply


CORRUPTIONS = {
    "a leaf is a float": _corrupt_leaves(lambda s: s["leaves"].__setitem__(0, 3.0)),
    "a leaf is None": _corrupt_leaves(lambda s: s["leaves"].__setitem__(1, None)),
    "no leaves": _corrupt_leaves(lambda s: s.pop("leaves")),
    "one leaf more": _corrupt_leaves(lambda s: s["leaves"].append(torch.zeros(3))),
    "one leaf fewer": _corrupt_leaves(lambda s: s["leaves"].pop()),
    "the group's state is a list": lambda sd: sd["state"].__setitem__(0, [1, 2]),
}


@pytest.mark.parametrize("n_big", [0, 2**22])
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupted_optimizer_state_dict_is_one_value_error_and_loads_nothing(name, n_big):
    # fo.Optimizer(...).load_state_dict(sd) where sd["state"][0]["leaves"][0] = 3.0 (or None,
    # or "leaves" deleted, or the group's entry a list) -> AttributeError "'float' object has
    # no attribute 'shape'"; with one leaf appended it loaded and stepped silently (the extra
    # leaf dropped by zip). Expected: one ValueError naming the group's state, and the
    # optimizer's state untouched (it still steps as the uncorrupted copy does).
    ps, opt = _trained(n_big)
    sd = copy.deepcopy(opt.state_dict())
    CORRUPTIONS[name](sd)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fresh = fo.Optimizer(qs, fo.adamw(1e-2, weight_decay=0.1))
    before = [x.clone() for x in fo.tree_leaves(fresh.transform_states[0])]
    with pytest.raises(ValueError, match="state of param group 0"):
        fresh.load_state_dict(sd)
    after = fo.tree_leaves(fresh.transform_states[0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_tree_from_state_dict_refuses_a_leaf_count_other_than_the_structures():
    tree = {"a": torch.ones(2), "b": torch.zeros(())}
    sd = tree_to_state_dict(tree)
    sd["leaves"] = [*sd["leaves"], torch.ones(1)]
    with pytest.raises(ValueError, match="holds 3 leaves but its structure"):
        tree_from_state_dict(sd, tree, "tree")
    good = tree_from_state_dict(tree_to_state_dict(tree), tree, "tree")
    assert torch.equal(good["a"], tree["a"]) and torch.equal(good["b"], tree["b"])


GROUP_CORRUPTIONS = {
    "a param group is a string": lambda sd: sd["param_groups"].__setitem__(0, "x"),
    "a param group has no params": lambda sd: sd["param_groups"][0].pop("params"),
    "a param group's params is an int": lambda sd: sd["param_groups"][0].__setitem__("params", 3),
    "shapes is a list": lambda sd: sd.__setitem__("shapes", [[10, 3], [4]]),
}


@pytest.mark.parametrize("name", sorted(GROUP_CORRUPTIONS))
def test_a_corrupted_param_group_entry_is_one_value_error(name):
    # load_state_dict(sd) with sd["param_groups"][0] = "x" -> TypeError "string indices must
    # be integers"; without "params" -> KeyError 'params'; "params": 3 -> TypeError "object of
    # type 'int' has no len()"; sd["shapes"] a list -> AttributeError. Expected: a ValueError
    # naming the entry and "pass the whole dict that Optimizer.state_dict() returned".
    ps, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    GROUP_CORRUPTIONS[name](sd)
    fresh = fo.Optimizer([p.detach().clone().requires_grad_() for p in ps],
                         fo.adamw(1e-2, weight_decay=0.1))
    with pytest.raises(ValueError):
        fresh.load_state_dict(sd)


# ----------------------------------------------------------------------------- schedules


def _params():
    return {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor(0.25)}


@pytest.mark.parametrize("make", [fo.adamw, fo.sgd, fo.lion])
@pytest.mark.parametrize("value, error, match", [
    (lambda c: torch.tensor([1e-2, 2e-2]), ValueError, r"shape \(2,\)"),
    (lambda c: "abc", TypeError, "returned a str"),
    (lambda c: float("nan"), ValueError, "returned nan"),
    (lambda c: -1e-3, ValueError, "finite number >= 0"),
])
def test_a_schedule_returning_no_usable_learning_rate_is_refused_naming_it(make, value, error, match):
    # fo.adamw(lambda c: torch.tensor([1e-2, 2e-2])).update(...) -> RuntimeError "shape '[]'
    # is invalid for input of size 2" (after init stored a (2,) learning rate); returning
    # "abc" -> TypeError "new(): invalid data type 'str'"; returning float('nan') or a negative
    # number -> NaN (or ascending) updates with no error, while the same numbers given as a
    # constant learning rate are refused. Expected: one error naming the schedule.
    p = _params()
    tx = make(value)
    with pytest.raises(error, match=match):
        state = tx.init(p)
        tx.update(p, state, p)


def test_a_schedule_of_0d_tensors_and_numbers_still_gives_the_float64_sgd_answer():
    # the checks above read only shapes and Python numbers: a schedule of tensors keeps working
    p = _params()
    for sched in (lambda c: 0.1 * 0.5 ** c, lambda c: torch.tensor(0.1) * 0.5 ** c,
                  lambda c: torch.tensor([0.1]) * 0.5 ** c):
        tx, q = fo.sgd(sched), p
        state = tx.init(q)
        for _ in range(3):
            u, state = tx.update(q, state, q)
            q = fo.apply_updates(q, u)
        ref = {k: v.double() * (1 - 0.1) * (1 - 0.05) * (1 - 0.025) for k, v in p.items()}
        for k in p:
            torch.testing.assert_close(q[k].double(), ref[k], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- bench --merge


@pytest.fixture(scope="module")
def two_pieces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dec06")
    out = {}
    for name in ("nist-misra1a", "nist-chwirut2"):
        out[name] = root / name
        assert bench_main(["--problems", name, "--optimizers", "lm", "--steps", "2", "--tune",
                           "off", "--no-progress", "--out", str(out[name])]) == 0
    return out


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "results.json").read_text())
    edit(data)
    (dst / "results.json").write_text(json.dumps(data))
    return dst


def _set(key, value):
    return lambda d: d["results"][0].__setitem__(key, value)


REPORT_CORRUPTIONS = {
    "curve_step shorter": (_set("curve_step", [1]), "curve_step, curve_time and curve_eval"),
    "curve_time empty": (_set("curve_time", []), "curve_step, curve_time and curve_eval"),
    "steps_to_target without its time": (_set("steps_to_target", 1), "steps_to_target"),
    "steps_to_target not an evaluation": (
        lambda d: d["results"][0].update(steps_to_target=-1, time_to_target_s=0.1),
        "steps_to_target"),
    "a seed's row twice": (lambda d: d["results"].append(copy.deepcopy(d["results"][0])),
                           "both lm on nist-chwirut2 with seed 0"),
    "a device that is no device": (lambda d: d["meta"].__setitem__("device", "x"), "meta.device"),
}


@pytest.mark.parametrize("name", sorted(REPORT_CORRUPTIONS))
def test_merge_of_a_corrupted_results_json_is_one_line_naming_the_field(name, two_pieces, tmp_path):
    # python -m funcopt.bench --merge A B --out R, with B's results.json edited: curve_step
    # shorter than curve_time -> IndexError traceback while plotting; steps_to_target set
    # without time_to_target_s -> TypeError traceback in the summary table; meta.device "x"
    # -> RuntimeError traceback from torch.device; a (problem, optimizer, seed) row twice ->
    # merged silently (that seed counted twice in the medians). Expected: exit with one line
    # "error: --merge <folder>: results.json is corrupt (...)" before anything is written.
    edit, match = REPORT_CORRUPTIONS[name]
    bad = _edited(two_pieces["nist-chwirut2"], tmp_path / "bad", edit)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        bench_main(["--merge", str(two_pieces["nist-misra1a"]), str(bad), "--out", str(out)])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: --merge") and "\n" not in msg, msg
    assert "corrupt" in msg and match in msg, msg
    assert not out.exists()


def test_merge_of_the_uncorrupted_pieces_still_writes_the_report(two_pieces, tmp_path):
    out = tmp_path / "report"
    assert bench_main(["--merge", *map(str, two_pieces.values()), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["problem"] for r in rows) == ["nist-chwirut2", "nist-misra1a"]


# ----------------------------------------------------------------------------- least squares

_T = torch.linspace(0, 3, 20, dtype=F64)
_Y = 2 * torch.exp(-1.3 * _T)


def _decay(p):
    return p[0] * torch.exp(-p[1] * _T) - _Y


@pytest.mark.parametrize("field", ["ftol", "gtol"])
def test_a_tolerance_that_holds_everywhere_is_refused(field):
    # fo.least_squares(a exp(-k t) - y, [1, 1], tolerances=fo.Tolerances(gtol=1.0)) -> success
    # True, reason "gtol ...", at x0 with cost 1.22 (the optimum has cost 0): a cosine is
    # never above 1. Tolerances(ftol=1.0) -> success after one step at cost 0.042: an accepted
    # step's relative reductions lie in [0, 1]. Expected: Tolerances refuses ftol >= 1 and
    # gtol >= 1 with a ValueError naming the field (MINPACK's tolerances are small numbers).
    with pytest.raises(ValueError, match=field):
        fo.Tolerances(**{field: 1.0})


@pytest.mark.parametrize("batched", [False, True])
def test_a_maximum_along_a_parameter_with_a_zero_jacobian_column_is_not_success(batched):
    # r(a) = [cos a0, a1 - 1] from a = 0: the fit moves a1 to 1 and stops with success True,
    # reason "gtol", cost 0.5, while cos(pi/2) = 0 gives cost 0: a0 = 0 is the cost's maximum
    # along a0, where J's column is exactly zero (0/0 read as a zero cosine). The batched fit
    # of cos(p) from p = 0 (3 problems) ends the same way. tests/test_adversarial_findings.py's
    # xfail covers only the single fit where J == 0 at x0 and no step was taken.
    if batched:
        _, info = fo.least_squares(torch.cos, torch.zeros(3, 1, dtype=F64), batched=True)
        assert not bool((info.success & (info.cost > 0.25)).any()), (info.success, info.cost)
    else:
        def r(a):
            return torch.stack([torch.cos(a[0]), a[1] - 1])
        _, info = fo.least_squares(r, torch.zeros(2, dtype=F64))
        assert not (info.success and info.cost > 0.25), (info.reason, info.cost)


def test_the_decay_fit_with_default_tolerances_reaches_the_optimum():
    # the reference for the tolerance xfail: the same fit with the defaults is a real success
    x, info = fo.least_squares(_decay, torch.ones(2, dtype=F64))
    assert info.success
    torch.testing.assert_close(x, torch.tensor([2.0, 1.3], dtype=F64), rtol=1e-10, atol=0)
