"""The benchmark's protocol: warm-up outside the clock, learning-rate sweeps on the validation
split, seeds with a spread, time to target, memory, and a report that explains itself."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

import funcopt.bench as fb
import funcopt.bench.optimizers as bench_optimizers
import funcopt.bench.problems as bench_problems
from funcopt.bench import deep, suite
from funcopt.bench.__main__ import main
from funcopt.bench.run import Result

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _registries_restored():
    saved = [(d, dict(d)) for d in (fb.PROBLEMS, fb.OPTIMIZERS, bench_problems.REQUIRES,
                                    bench_optimizers.LEARNING_RATES)]
    lists = [(lst, list(lst)) for lst in (bench_problems.DEFAULT_PROBLEMS,
                                          bench_problems.FULL_PROBLEMS,
                                          bench_optimizers.DEFAULT_OPTIMIZERS)]
    yield
    for d, old in saved:
        d.clear()
        d.update(old)
    for lst, old in lists:
        lst[:] = old


def _scalar_problem(name: str, *, val=lambda x: x * x, test=lambda x: x * x, steps=6,
                    target=None, x0=1.0):
    """A one-parameter problem whose validation and test losses are given functions of x."""
    @fb.register(name)
    def build(seed, device):
        x = torch.tensor(float(x0), dtype=torch.float64)
        return fb.Problem(params={"x": x}, loss_fn=lambda p, b=None: 0.5 * p["x"] ** 2,
                          batches=lambda step: None, steps=steps, target=target,
                          validate=lambda p: {"loss": float(val(p["x"]))},
                          evaluate=lambda p: {"loss": float(test(p["x"]))},
                          loss_name="test units")
    return build


def _jump_optimizer(name: str, lr: float, sleep_first: float = 0.0):
    """step sets x = lr (whatever the gradient); the first call in the process sleeps."""
    calls = []

    @fb.register_optimizer(name, lr=lr, default=False)
    def build(problem, lr):
        def step(params, state, batch):
            if not calls:
                time.sleep(sleep_first)
            calls.append(1)
            return {"x": torch.full_like(params["x"], lr)}, state + 1, torch.zeros(())
        return fb.Runner(lambda p: torch.zeros((), dtype=torch.int64), step)
    return build


# ----------------------------------------------------------------------------- honest time


@pytest.mark.parametrize("warmup", [0, 3])
def test_first_call_costs_are_set_up_not_training_time(warmup):
    _scalar_problem("p-scalar")
    _jump_optimizer("slow-first", 1.0, sleep_first=0.4)
    r = fb.run_one("p-scalar", "slow-first", seed=0, device=CPU, warmup=warmup)
    assert r.status == "ok" and r.warmup_steps == warmup
    if warmup:  # the 0.4 s first call fell in the warm-up, on a copy
        assert r.wall_s < 0.2 and r.setup_s >= 0.4
    else:
        assert r.wall_s >= 0.4
    assert r.time_per_step_s < 0.2  # the median step, not the slow one


def test_warm_up_runs_on_a_copy_and_changes_no_number():
    a = fb.run_one("digits-logreg", "adamw", seed=0, device=CPU, steps=6, warmup=0)
    b = fb.run_one("digits-logreg", "adamw", seed=0, device=CPU, steps=6, warmup=3)
    assert a.curve_eval == b.curve_eval and a.final == b.final and a.curve_loss == b.curve_loss


def test_wall_time_is_the_sum_of_steps_and_time_per_step_their_median():
    _scalar_problem("p-scalar", steps=5)
    sleeps = [0.0, 0.0, 0.3, 0.0, 0.0]

    @fb.register_optimizer("sleepy", default=False)
    def build(problem):
        def step(params, state, batch):
            time.sleep(sleeps[int(state)])
            return params, state + 1, torch.zeros(())
        return fb.Runner(lambda p: torch.zeros((), dtype=torch.int64), step)

    r = fb.run_one("p-scalar", "sleepy", seed=0, device=CPU, warmup=0)
    assert r.wall_s >= 0.3 and r.time_per_step_s < 0.1
    assert r.curve_time[-1] == pytest.approx(r.wall_s)


# ----------------------------------------------------------------------------- tuning


def test_the_sweep_picks_by_validation_loss_never_by_test_loss():
    # validation prefers x = 1 (the default rate), test prefers x = 0.316 (a grid point)
    _scalar_problem("p-val", val=lambda x: (x - 1) ** 2, test=lambda x: (x - 0.316) ** 2)
    _jump_optimizer("jump", 1.0)
    results, sweeps = suite.run_suite(["p-val"], ["jump"], seeds=[0], tune=True,
                                      grid=suite.GRIDS["quick"], device=CPU)
    (s,) = sweeps
    assert s.learning_rates == pytest.approx([10 ** -0.5, 1.0, 10 ** 0.5])
    expected = [(lr - 1) ** 2 for lr in s.learning_rates]
    assert s.val_loss == pytest.approx(expected)
    assert s.chosen == 1.0 and s.edge == ""
    (r,) = results
    assert r.learning_rate == 1.0 and r.final["loss"] == pytest.approx((1 - 0.316) ** 2)


def test_a_rate_at_the_grid_edge_is_noted_and_a_diverged_one_is_not_chosen():
    _scalar_problem("p-edge", val=lambda x: (x - 10) ** 2 if x < 3 else float("nan"))
    _jump_optimizer("jump", 1.0)
    results, sweeps = suite.run_suite(["p-edge"], ["jump"], seeds=[0], tune=True,
                                      grid=suite.GRIDS["quick"], device=CPU)
    (s,) = sweeps
    assert s.val_loss[2] is None and s.chosen == 1.0  # 3.16 ended non-finite
    assert results[0].status == "ok"
    # the best rate lies beyond the grid and its 2 extensions (0.316 ... 3.16, 10, 31.6)
    _scalar_problem("p-up", val=lambda x: (x - 1000) ** 2)
    _, sweeps = suite.run_suite(["p-up"], ["jump"], seeds=[0], tune=True,
                                grid=suite.GRIDS["quick"], device=CPU)
    assert sweeps[0].edge == "upper" and sweeps[0].chosen == pytest.approx(10 ** 1.5)
    assert any("grid's upper end" in n for n in suite.notes([], sweeps))


def test_tune_off_runs_the_default_once_and_a_method_without_a_rate_is_not_swept():
    _scalar_problem("p-val", val=lambda x: (x - 1) ** 2)
    _jump_optimizer("jump", 0.5)
    results, sweeps = suite.run_suite(["p-val"], ["jump"], seeds=[0], tune=False,
                                      grid=suite.GRIDS["quick"], device=CPU)
    assert sweeps == [] and [r.learning_rate for r in results] == [0.5]
    results, sweeps = suite.run_suite(["nist-misra1a"], ["lm"], seeds=[0], tune=True,
                                      grid=suite.GRIDS["quick"], device=CPU, steps=2)
    assert sweeps == [] and results[0].learning_rate is None


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), "1e-3", True])
def test_register_optimizer_refuses_a_bad_default_rate(lr):
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fb.register_optimizer("bad-rate", lr=lr)


# ----------------------------------------------------------------------------- seeds


def test_seeds_give_one_row_each_and_the_summary_is_their_mean_and_sd(tmp_path):
    out = tmp_path / "rep"
    assert main(["--problems", "digits-logreg", "--optimizers", "adamw", "--steps", "5",
                 "--seeds", "3", "--seed", "4", "--tune", "off", "--no-progress",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["results"]
    assert [r["seed"] for r in rows] == [4, 5, 6]
    losses = np.array([r["final"]["loss"] for r in rows])
    assert len(set(losses)) == 3  # the seeds differ
    (summary,) = data["summary"]
    assert summary["test_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    assert summary["test_loss_sd"] == pytest.approx(losses.std(ddof=1), rel=1e-12)
    for r in rows:
        assert {"learning_rate", "schedule", "batch_size", "seed", "wall_s",
                "time_per_step_s", "setup_s", "state_bytes", "peak_mb"} <= set(r)
        assert r["learning_rate"] == pytest.approx(3e-3 * 10 ** 0.5)  # default x lr_scale
        assert r["batch_size"] == 128 and r["schedule"] == "constant"
    assert f"{summary['test_loss']:.4g} ± " in (out / "report.md").read_text()


def _row(opt, mean, sd, seeds=3):
    return {"problem": "p", "optimizer": opt, "test_loss": mean, "test_loss_sd": sd, "seeds": seeds}


def test_a_win_needs_intervals_that_do_not_overlap():
    assert "a wins" in suite.winners([_row("a", 1.0, 0.1), _row("b", 1.5, 0.1)])["p"]
    tied = suite.winners([_row("a", 1.0, 0.1), _row("b", 1.15, 0.1), _row("gamma", 2.0, 0.1)])["p"]
    assert tied.startswith("no clear winner: a, b ") and "gamma" not in tied
    one = suite.winners([_row("a", 1.0, None, 1), _row("b", 5.0, None, 1)])["p"]
    assert "no winner is called" in one


# ----------------------------------------------------------------------------- target, memory


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    _scalar_problem("p-halving", steps=8, target=0.01)

    @fb.register_optimizer("halve", default=False)
    def build(problem):
        return fb.Runner(lambda p: (), lambda p, s, b: ({"x": p["x"] / 2}, s, torch.zeros(())))

    r = fb.run_one("p-halving", "halve", seed=0, device=CPU, evals=8)
    # validation loss x^2 = 4^-t: 0.0625 at t = 2, 0.0156 at t = 3, 0.0039 at t = 4
    assert r.steps_to_target == 4 and r.time_to_target_s == r.curve_time[4]
    assert r.curve_step == list(range(9))


def test_state_bytes_are_the_state_tensors_bytes():
    _scalar_problem("p-scalar")

    @fb.register_optimizer("stateful", default=False)
    def build(problem):
        init = lambda p: (torch.zeros(10, dtype=torch.float64), torch.zeros(3, dtype=torch.int32))
        return fb.Runner(init, lambda p, s, b: (p, s, torch.zeros(())))

    r = fb.run_one("p-scalar", "stateful", seed=0, device=CPU)
    assert r.state_bytes == 10 * 8 + 3 * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_cpu_peak_memory_is_per_run():
    """A run that allocates 300 MB has a peak 300 MB above the small run after it (the
    process's lifetime peak would give both the same number)."""
    _scalar_problem("p-scalar")

    @fb.register_optimizer("hungry", default=False)
    def build(problem):
        def step(params, state, batch):
            big = torch.ones(300 * 2**20 // 8, dtype=torch.float64)
            return params, state, big.sum() * 0
        return fb.Runner(lambda p: (), step)

    big = fb.run_one("p-scalar", "hungry", seed=0, device=CPU, steps=2)
    _jump_optimizer("jump-small", 1.0)
    small = fb.run_one("p-scalar", "jump-small", seed=0, device=CPU, steps=2)
    if "reset at its start" not in small.memory_kind:
        pytest.skip("the peak RSS cannot be reset here")
    assert big.peak_mb - small.peak_mb > 250


# ----------------------------------------------------------------------------- the report


def test_nothing_failed_means_no_failure_list_and_skips_are_one_line_per_reason(tmp_path):
    out = tmp_path / "rep"
    assert main(["--problems", "nist-misra1a,nist-chwirut2", "--optimizers", "lm,adamw,lion",
                 "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Failed" not in text and "failed" not in text.split("## Notes")[0].lower()
    skipped = [line for line in text.splitlines() if line.startswith("- adamw")]
    assert skipped == ["- adamw, lion on nist-misra1a, nist-chwirut2: first-order methods are "
                       "not run on the curve fits (see LM)"]
    assert "residual sum of squares for nist-misra1a, nist-chwirut2" in text
    for column in ("lr", "steps to target", "ms/step", "setup (s)", "opt. state", "peak mem (MB)"):
        assert f"- {column}" in text or f", {column}" in text or f"{column}:" in text


def test_plots_name_the_loss_of_each_problem(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    labels = []
    real = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda ax, s, *a, **k: (labels.append(s), real(ax, s, *a, **k))[1])
    assert main(["--problems", "digits-logreg,nist-misra1a", "--optimizers", "adamw,lm",
                 "--steps", "3", "--no-progress", "--out", str(tmp_path / "rep")]) == 0
    assert "validation cross-entropy (nats)" in labels
    assert "validation residual sum of squares" in labels
    assert "final validation cross-entropy (nats)" in labels  # the sweep plot
    assert (tmp_path / "rep" / "lr_sweep.png").is_file()
    assert "eval loss" not in labels


def test_a_held_out_loss_that_rises_is_noted():
    r = Result("p", "o", "ok", curve_step=[0, 10, 20, 30], curve_eval=[1.0, 0.22, 0.28, 0.33],
               final={"loss": 0.33, "train_loss": 0.05})
    (note,) = suite.notes([r], [])
    assert "rose from 0.22 (step 10) to 0.33" in note and "overfits" in note
    r.curve_eval = [1.0, 0.5, 0.3, 0.3]
    assert suite.notes([r], []) == []


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("bad, message", [
    (["--seeds", "0"], "--seeds"),
    (["--warmup", "-1"], "--warmup"),
    (["--seed", str(2**63 - 1), "--seeds", "2"], "--seed"),
])
def test_bad_protocol_options_are_one_line(tmp_path, bad, message):
    with pytest.raises(SystemExit) as e:
        main(["--problems", "nist-misra1a", "--no-progress", "--out", str(tmp_path / "r")] + bad)
    assert message in str(e.value.code) and list(tmp_path.iterdir()) == []


def test_the_suites():
    assert {"char-transformer", "cifar-cnn", "digits-logreg", "nist-misra1a"} <= \
        set(bench_problems.DEFAULT_PROBLEMS)
    assert {"char-transformer-large", "cifar-cnn-large", "mnist1d-mlp", "digits-cnn"} <= \
        set(bench_problems.FULL_PROBLEMS)
    assert suite.SEEDS == {"quick": 1, "full": 3}
    assert len(suite.GRIDS["full"]) > len(suite.GRIDS["quick"]) >= 3
    for grid in suite.GRIDS.values():  # a log grid around the default
        logs = np.log10(grid)
        assert 1.0 in grid and np.allclose(np.diff(logs), 0.5)


# ----------------------------------------------------------------------------- problems


def test_the_transformer_is_causal():
    torch.manual_seed(0)
    model = deep.CharTransformer(vocab=20, context=12, width=16, heads=4, layers=2)
    x = torch.randint(20, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 20  # change the future only
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_the_corpus_ships_with_python_and_the_images_are_fixed():
    text = deep.corpus()
    assert len(text) > 100_000 and "def" in text
    x1, y1 = deep.shapes_images(64, seed=3)
    deep.shapes_images.cache_clear()
    x2, y2 = deep.shapes_images(64, seed=3)
    assert x1.shape == (64, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1.tolist()) <= set(range(10)) and len(set(y1.tolist())) >= 8


@pytest.mark.parametrize("name", ["char-transformer", "cifar-cnn"])
def test_the_new_problems_train(name):
    r = fb.run_one(name, "adamw", seed=0, device=CPU, steps=30, lr=1e-2)
    assert r.status == "ok" and r.target is not None
    assert r.curve_eval[-1] < 0.9 * r.curve_eval[0]
    assert r.final["loss"] < r.curve_eval[0] and "train_loss" in r.final
