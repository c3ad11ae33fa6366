"""The main job: deterministic for a seed, clear errors for bad options, no partial report."""

import json

import pytest

import funcopt.bench as fb
from funcopt.bench.__main__ import main

ARGS = ["--problems", "digits-logreg,nist-misra1a", "--optimizers", "adamw,lm", "--steps", "8",
        "--no-progress"]


def _numbers(path):
    res = json.loads((path / "results.json").read_text())["results"]
    return [(r["problem"], r["optimizer"], r["status"], r["final"], r["curve_loss"], r["curve_eval"])
            for r in res]


def test_same_seed_gives_identical_results(tmp_path):
    assert main(ARGS + ["--out", str(tmp_path / "a")]) == 0
    assert main(ARGS + ["--out", str(tmp_path / "b")]) == 0
    a, b = _numbers(tmp_path / "a"), _numbers(tmp_path / "b")
    assert a == b
    ran = [(p, o) for p, o, status, *_ in a if status == "ok"]
    assert ("digits-logreg", "adamw") in ran and ("nist-misra1a", "lm") in ran
    for name in ("report.md", "loss_vs_step.png", "loss_vs_time.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0


@pytest.mark.parametrize("bad, message", [
    (["--optimizers", "nope"], "unknown optimizer 'nope'"),
    (["--problems", "nope"], "unknown problem 'nope'"),
    (["--device", "cuda:7"], "cuda"),
    (["--steps", "0"], "--steps"),
])
def test_bad_options_exit_with_a_message_and_write_nothing(tmp_path, bad, message):
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as e:
        main(["--no-progress", "--out", str(out)] + bad)
    assert e.value.code != 0 and message in str(e.value.code)
    assert not out.exists() and not out.with_name("rep.partial").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder under any name either


def test_a_failing_optimizer_is_reported_and_the_exit_status_says_so(tmp_path):
    def broken(problem):
        def step(params, state, batch):
            raise RuntimeError("boom")
        return fb.Runner(lambda p: (), step)

    fb.OPTIMIZERS["broken-for-test"] = broken
    try:
        rc = main(["--problems", "digits-logreg", "--optimizers", "adamw,broken-for-test",
                   "--steps", "3", "--no-progress", "--out", str(tmp_path / "r")])
    finally:
        del fb.OPTIMIZERS["broken-for-test"]
    assert rc == 1
    status = {opt: st for _, opt, st, *_ in _numbers(tmp_path / "r")}
    assert status == {"adamw": "ok", "broken-for-test": "failed"}
    assert "RuntimeError: boom" in (tmp_path / "r" / "report.md").read_text()
