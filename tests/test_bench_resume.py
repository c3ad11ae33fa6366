"""``python -m funcopt.bench --resume``: a command cut off keeps its finished runs in --out
(runs.json); the same command with --resume runs only the missing ones and writes the report an
uninterrupted command writes, its header naming the runs taken from the earlier command(s).
Saved runs made under other settings or code, a corrupt file, and a plain command over saved
runs are refused, one line each."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_bench_cli import _registries_restored  # noqa: F401 (autouse: undoes plugins)
from test_bench_merge import _body, _error, _untimed

import funcopt.bench.suite as suite
from funcopt.bench.__main__ import main
from funcopt.bench.load import RUNS
from funcopt.bench.run import run_one

ROOT = Path(__file__).parents[1]
ARGS = ["--problems", "digits-logreg", "--optimizers", "sgd-momentum,adamw", "--steps", "4",
        "--seeds", "2", "--no-progress"]
TIMED = ("wall_s", "time_per_step_s", "setup_s", "time_to_target_s", "peak_mb")


class _Runs:
    """``suite.run_one``, counted: the (problem, optimizer, seed, lr) of each run made. Run
    number ``cut`` raises KeyboardInterrupt instead (Ctrl-C, or a time limit's signal)."""

    def __init__(self, cut: int | None = None):
        self.calls: list[tuple] = []
        self.cut = cut

    def __call__(self, problem, optimizer, *, seed, lr, **kw):
        if len(self.calls) + 1 == self.cut:
            raise KeyboardInterrupt
        self.calls.append((problem, optimizer, seed, lr))
        return run_one(problem, optimizer, seed=seed, lr=lr, **kw)


def _main(mp: pytest.MonkeyPatch, argv: list[str], cut: int | None = None) -> tuple[int, _Runs]:
    runs = _Runs(cut)
    mp.setattr(suite, "run_one", runs)
    return main(argv), runs


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, list]:
    """An uninterrupted command's report, and the runs it made in order."""
    out = tmp_path_factory.mktemp("single") / "rep"
    with pytest.MonkeyPatch.context() as mp:
        rc, runs = _main(mp, [*ARGS, "--out", str(out)])
    assert rc == 0 and len(runs.calls) >= 8
    return out, runs.calls


@pytest.fixture(scope="module")
def cut(tmp_path_factory) -> Path:
    """The folder of a command cut off before its 4th run."""
    out = tmp_path_factory.mktemp("cut") / "rep"
    with pytest.MonkeyPatch.context() as mp:
        assert _main(mp, [*ARGS, "--out", str(out)], cut=4)[0] == 130
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_command_cut_off_twice_and_resumed_writes_the_uninterrupted_report(
        single, tmp_path, monkeypatch, capsys):
    out, calls = tmp_path / "rep", single[1]
    rc, first = _main(monkeypatch, [*ARGS, "--out", str(out)], cut=4)
    err = capsys.readouterr().err
    assert rc == 130 and first.calls == calls[:3]
    assert f"3 finished runs are saved in {out / RUNS}" in err and "--resume" in err
    assert os.listdir(out) == [RUNS] and sorted(os.listdir(tmp_path)) == ["rep"]
    cut_once = _json(out / RUNS)
    rc, second = _main(monkeypatch, [*ARGS, "--out", str(out), "--resume"], cut=3)
    assert rc == 130 and second.calls == calls[3:5]  # the 3 saved ones were not run again
    saved = _json(out / RUNS)
    assert saved["runs"][:3] == cut_once["runs"] and len(saved["runs"]) == 5
    assert [e["by"] for e in saved["runs"]] == [0, 0, 0, 1, 1]
    rc, third = _main(monkeypatch, [*ARGS, "--out", str(out), "--resume"])
    assert rc == 0 and third.calls == calls[5:]
    assert "resuming: the 5 runs saved" in capsys.readouterr().err

    mine, theirs = _json(out / "results.json"), _json(single[0] / "results.json")
    assert _untimed(mine["results"]) == _untimed(theirs["results"])
    assert mine["sweeps"] == theirs["sweeps"]
    assert [{k: v for k, v in row.items() if k not in TIMED} for row in mine["summary"]] == \
        [{k: v for k, v in row.items() if k not in TIMED} for row in theirs["summary"]]
    assert set(mine["meta"]) == {*theirs["meta"], "resumed"}
    for key in ("suite", "seeds", "grid", "steps", "problems", "optimizers", "device_name"):
        assert mine["meta"][key] == theirs["meta"][key]
    # a run taken is the earlier command's, its timings included
    earlier = {(r["problem"], r["optimizer"], r["seed"], r["learning_rate"]): r
               for r in (e["result"] for e in saved["runs"])}
    taken = [r for r in mine["results"]
             if (r["problem"], r["optimizer"], r["seed"], r["learning_rate"]) in earlier]
    assert taken and all(r == earlier[r["problem"], r["optimizer"], r["seed"],
                                      r["learning_rate"]] for r in taken)
    resumed = mine["meta"]["resumed"]
    assert [r["runs"] for r in resumed] == [3, 2]
    assert [r["date"] for r in resumed] == [p["date"] for p in saved["processes"][:2]]
    report = (out / "report.md").read_text()
    assert _body(report) == _body((single[0] / "report.md").read_text())
    header = report[:report.index("## Results")]
    assert "5 of the runs" in header and "cut off" in header
    for r in resumed:
        assert f"`{r['command']}`" in header and r["date"] in header and r["until"] in header
    assert sorted(os.listdir(out)) == sorted(os.listdir(single[0]))  # runs.json went with it

    merged = tmp_path / "merged"  # a merged report still says so
    assert main(["--merge", str(out), "--out", str(merged)]) == 0
    assert "3 of its runs from a cut-off command of" in (merged / "report.md").read_text()


PLUGIN = """
    import os
    import signal

    import funcopt.bench as fb
    from funcopt.bench.optimizers import OPTIMIZERS

    built = []


    @fb.register_optimizer("adamw-killed", lr=3e-3)
    def build(problem, lr):
        built.append(lr)
        if len(built) == int(os.environ.get("KILL_AT", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
        return OPTIMIZERS["adamw"](problem, lr=lr)
"""


def test_a_command_killed_outright_is_resumed(tmp_path):
    """SIGKILL (a time limit's last word): no clean-up runs, and the saved runs are whole."""
    plugin = tmp_path / "killing.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    out = tmp_path / "rep"
    argv = [sys.executable, "-m", "funcopt.bench", "--plugin", str(plugin), "--problems",
            "digits-logreg", "--optimizers", "adamw-killed", "--steps", "3", "--no-progress",
            "--out", str(out)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    killed = subprocess.run(argv, env={**env, "KILL_AT": "3"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert os.listdir(out) == [RUNS] and len(_json(out / RUNS)["runs"]) == 2
    done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming: the 2 runs saved" in done.stderr
    assert [r["runs"] for r in _json(out / "results.json")["meta"]["resumed"]] == [2]


def _edit(path: str, value):
    def edit(data):
        *keys, last = path.split(".")
        node = data
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return edit


def _copy(cut: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(cut, dst)
    if edit is not None:
        data = _json(dst / RUNS)
        edit(data)
        (dst / RUNS).write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("extra, edit, expected", [
    (["--seeds", "3"], None, "seeds [0, 1]"),
    (["--seed", "1"], None, "seeds [0, 1]"),
    (["--steps", "5"], None, "steps 4"),
    (["--warmup", "1"], None, "warmup 3"),
    (["--tune", "off"], None, "tune True"),
    (["--optimizers", "adamw"], None, "optimizers ['sgd-momentum', 'adamw']"),
    ([], _edit("meta.device_name", "NVIDIA H100 80GB HBM3"), "device_name 'NVIDIA H100"),
    ([], _edit("meta.torch", "1.0.0+other"), "torch '1.0.0+other'"),
    ([], _edit("meta.python", "2.7.18"), "python '2.7.18'"),
    ([], _edit("meta.threads", 4), "threads 4"),
    ([], _edit("meta.code.funcopt", "0" * 16), "funcopt's source code has changed"),
    ([], _edit("meta.code.optimizer adamw", "other"), "the code of optimizer adamw has changed"),
])
def test_saved_runs_of_other_settings_are_refused(cut, tmp_path, monkeypatch, extra, edit,
                                                  expected):
    out = _copy(cut, tmp_path / "rep", edit)
    before = (out / RUNS).read_text()
    runs = _Runs()
    monkeypatch.setattr(suite, "run_one", runs)
    msg = _error([*ARGS, *extra, "--out", str(out), "--resume"])
    assert msg.startswith(f"error: --resume: {out / RUNS}: ") and expected in msg
    assert "python -m funcopt.bench --problems" in msg and "--force" in msg  # the way on
    assert runs.calls == [] and (out / RUNS).read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["rep"]  # no partial folder left


@pytest.mark.parametrize("text, edit, expected", [
    ('{"format": "funcopt.bench saved', None, "is corrupt or not a file of saved runs"),
    ("[]", None, "no \"format\""),
    (None, _edit("format", "funcopt.bench saved runs 0"), "no \"format\""),
    (None, _edit("runs.0.result.final", None), "runs[0].result has no field 'final'"),
    (None, _edit("runs.1.lr", "x"), "runs[1].lr is missing or of the wrong type"),
    (None, _edit("runs.2.by", 7), "runs[2] has no lr or names no process"),
    (None, _edit("meta.device", "gpu"), "meta.device 'gpu' is not a device name"),
    (None, _edit("meta.seeds", None), "meta.seeds is missing"),
    (None, lambda data: data["runs"].append(data["runs"][0]), "runs[3] is a second"),
])
def test_a_corrupt_or_foreign_file_is_one_line(cut, tmp_path, text, edit, expected):
    out = _copy(cut, tmp_path / "rep", edit)
    if text is not None:
        (out / RUNS).write_text(text)
    msg = _error([*ARGS, "--out", str(out), "--resume"])
    assert f"{out / RUNS}: is corrupt or not a file of saved runs" in msg and expected in msg
    assert "--force" in msg


def test_a_report_as_the_saved_runs_is_foreign(single, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    shutil.copy(single[0] / "results.json", out / RUNS)
    assert "not a file of saved runs" in _error([*ARGS, "--out", str(out), "--resume"])


def test_resume_with_nothing_saved_runs_everything(single, tmp_path, monkeypatch, capsys):
    """So that one command line serves the first attempt and every retry."""
    out = tmp_path / "rep"
    rc, runs = _main(monkeypatch, [*ARGS, "--out", str(out), "--resume"])
    assert rc == 0 and runs.calls == single[1]
    assert "holds no saved runs" in capsys.readouterr().err
    assert "resumed" not in _json(out / "results.json")["meta"]


def test_saved_runs_are_not_lost_to_a_plain_command(cut, single, tmp_path, monkeypatch):
    """Without --resume they are refused (they may be hours of work); --force starts over."""
    out = _copy(cut, tmp_path / "rep")
    msg = _error([*ARGS, "--out", str(out)])
    assert "holds the saved runs of a command that was cut off" in msg and "--resume" in msg \
        and "--force" in msg
    msg = _error(["--merge", str(out), "--out", str(tmp_path / "m")])
    assert "not a complete report but the saved runs" in msg and "--resume" in msg
    assert "--resume does not apply" in _error(["--merge", str(out), "--resume", "--out",
                                                str(tmp_path / "m")])
    rc, runs = _main(monkeypatch, [*ARGS, "--out", str(out), "--force"])
    assert rc == 0 and runs.calls == single[1]
    assert "resumed" not in _json(out / "results.json")["meta"] and not (out / RUNS).exists()


def test_a_kill_while_saving_leaves_the_earlier_file(single, tmp_path, monkeypatch, capsys):
    """The file is written beside and renamed over: cut off in between, the old one stands
    (and the half-way file does not stop --resume)."""
    import funcopt.bench.resume as resume

    real, renames = os.replace, []

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    out = tmp_path / "rep"
    with monkeypatch.context() as mp:
        mp.setattr(resume.os, "replace", replace)
        assert _main(mp, [*ARGS, "--out", str(out)])[0] == 130
    assert "1 finished runs are saved" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [RUNS, RUNS + ".tmp"]
    assert len(_json(out / RUNS)["runs"]) == 1 and len(_json(out / (RUNS + ".tmp"))["runs"]) == 2
    rc, runs = _main(monkeypatch, [*ARGS, "--out", str(out), "--resume"])
    assert rc == 0 and runs.calls == single[1][1:]
    assert sorted(os.listdir(out)) == sorted(os.listdir(single[0]))


FLAKY = """
    from pathlib import Path

    import funcopt.bench as fb
    from funcopt.bench.optimizers import OPTIMIZERS

    COUNT = Path(__file__).with_suffix(".count")  # builds so far, over every process


    @fb.register_optimizer("adamw-flaky", lr=3e-3)
    def build(problem, lr):
        n = int(COUNT.read_text()) if COUNT.exists() else 0
        COUNT.write_text(str(n + 1))
        if n == 0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return OPTIMIZERS["adamw"](problem, lr=lr)
"""


def test_a_saved_run_that_failed_runs_again(tmp_path, monkeypatch, capsys):
    """A failed run (a transient out-of-memory error, say) is not taken back but made again,
    its new result replacing it; the runs that finished are taken, not run again."""
    plugin = tmp_path / "flaky_plugin.py"
    plugin.write_text(textwrap.dedent(FLAKY))
    out = tmp_path / "rep"
    argv = ["--plugin", str(plugin), "--problems", "digits-logreg", "--optimizers",
            "adamw-flaky,adamw", "--steps", "3", "--seeds", "2", "--tune", "off",
            "--no-progress", "--out", str(out)]
    rc, first = _main(monkeypatch, argv, cut=4)  # cut off before adamw's second seed
    assert rc == 130 and [c[:3] for c in first.calls] == [
        ("digits-logreg", "adamw-flaky", 0), ("digits-logreg", "adamw-flaky", 1),
        ("digits-logreg", "adamw", 0)]
    saved = _json(out / RUNS)["runs"]
    assert [e["result"]["status"] for e in saved] == ["failed", "ok", "ok"]
    assert "CUDA out of memory" in saved[0]["result"]["reason"]
    capsys.readouterr()
    rc, second = _main(monkeypatch, [*argv, "--resume"], cut=2)  # cut off again
    assert "but for the 1 that failed, which run again" in capsys.readouterr().err
    assert rc == 130 and [c[:3] for c in second.calls] == [("digits-logreg", "adamw-flaky", 0)]
    resaved = _json(out / RUNS)["runs"]  # the new result in the failed one's place
    assert [e["result"]["status"] for e in resaved] == ["ok", "ok", "ok"]
    assert [e["by"] for e in resaved] == [1, 0, 0] and resaved[1:] == saved[1:]
    rc, third = _main(monkeypatch, [*argv, "--resume"])
    assert rc == 0 and [c[:3] for c in third.calls] == [("digits-logreg", "adamw", 1)]
    results = _json(out / "results.json")
    assert [(r["optimizer"], r["seed"], r["status"]) for r in results["results"]] == [
        ("adamw-flaky", 0, "ok"), ("adamw-flaky", 1, "ok"), ("adamw", 0, "ok"),
        ("adamw", 1, "ok")]
    # the first command's two that finished, and the second's run of the one that failed
    assert [r["runs"] for r in results["meta"]["resumed"]] == [2, 1]
    assert "Failed:" not in (out / "report.md").read_text()
