"""The benchmark command line: every option is checked before anything runs, a user's files are
never deleted, and a user's mistake is one line and exit status 1, never a traceback."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import funcopt.bench as fb
import funcopt.bench.optimizers as bench_optimizers
import funcopt.bench.problems as bench_problems
from funcopt.bench.__main__ import main
from funcopt.bench.report import MARKER

ROOT = Path(__file__).parents[1]
TINY = ["--problems", "nist-misra1a", "--optimizers", "lm", "--steps", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _registries_restored():
    """Plugins and tests register problems and optimizers; leave the registries as found."""
    saved = [(d, dict(d)) for d in (fb.PROBLEMS, fb.OPTIMIZERS, bench_problems.REQUIRES)]
    lists = [(lst, list(lst)) for lst in (bench_problems.DEFAULT_PROBLEMS,
                                          bench_optimizers.DEFAULT_OPTIMIZERS)]
    modules = set(sys.modules)
    yield
    for d, old in saved:
        d.clear()
        d.update(old)
    for lst, old in lists:
        lst[:] = old
    for name in set(sys.modules) - modules:
        if name.startswith("_funcopt_plugin_") or name.startswith("cli_plugin_"):
            del sys.modules[name]


def _error(argv, cwd=None) -> str:
    """Run main(argv) (in ``cwd``), expect a SystemExit with a message, return the message."""
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        with pytest.raises(SystemExit) as e:
            main(argv)
    finally:
        os.chdir(old)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert "\n" not in e.value.code
    return e.value.code


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name or p.name.endswith(".old"))


def _results(out: Path) -> dict[tuple[str, str], dict]:
    res = json.loads((out / "results.json").read_text())["results"]
    return {(r["problem"], r["optimizer"]): r for r in res}


# ----------------------------------------------------------------------------- --out


def test_a_folder_of_the_users_files_is_refused_and_kept(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    msg = _error(TINY + ["--out", str(user)])
    assert "--force" in msg and "notes.txt" in msg
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "precious"
    assert _leftovers(tmp_path) == []


def test_force_replaces_a_folder_of_other_files(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert main(TINY + ["--out", str(user), "--force"]) == 0
    assert sorted(p.name for p in user.iterdir()) == sorted(
        [MARKER, "report.md", "results.json", "loss_vs_step.png", "loss_vs_time.png"])
    assert _leftovers(tmp_path) == []


def test_rerunning_onto_its_own_report_replaces_it(tmp_path):
    out = tmp_path / "bench-report"
    assert main(TINY + ["--out", str(out), "--seed", "1"]) == 0
    assert (out / MARKER).is_file()
    assert main(TINY + ["--out", str(out), "--seed", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["meta"]["seed"] == 2
    assert _leftovers(tmp_path) == []


def test_an_earlier_report_with_a_file_added_is_refused(tmp_path):
    out = tmp_path / "rep"
    assert main(TINY + ["--out", str(out)]) == 0
    (out / "analysis.ipynb").write_text("{}")
    assert "analysis.ipynb" in _error(TINY + ["--out", str(out)])
    assert (out / "analysis.ipynb").is_file()


def test_an_empty_folder_and_a_new_nested_path_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(TINY + ["--out", str(tmp_path / "empty")]) == 0
    assert main(TINY + ["--out", str(tmp_path / "a" / "b" / "rep")]) == 0
    assert (tmp_path / "empty" / "report.md").is_file()
    assert (tmp_path / "a" / "b" / "rep" / "report.md").is_file()


@pytest.mark.parametrize("out, message", [
    ("a_file", "is an existing file"),
    ("a_file/rep", "which is a file"),
    (".", "current folder"),
    ("..", "current folder"),
    ("", "current folder"),
    ("link", "symbolic link"),
])
def test_out_paths_that_cannot_take_a_report_are_refused(tmp_path, out, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a_file").write_text("keep")
    (work / "target").mkdir()
    (work / "link").symlink_to(work / "target")
    before = sorted(os.listdir(work))
    assert message in _error(TINY + ["--out", out], cwd=work)
    assert sorted(os.listdir(work)) == before and (work / "a_file").read_text() == "keep"
    assert os.listdir(work / "target") == []


def _make_read_only(folder: Path):
    """chmod works for a normal user; root writes anyway, so there the folder is made immutable."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("inside", [True, False])
def test_a_read_only_place_is_refused_before_running(tmp_path, inside):
    ro = tmp_path / "ro"
    ro.mkdir()
    if inside:  # an earlier report that cannot be replaced
        (ro / MARKER).write_text("")
    undo = _make_read_only(ro)
    try:
        msg = _error(TINY + ["--out", str(ro if inside else ro / "rep")])
    finally:
        undo()
    assert "read-only" in msg
    assert _leftovers(tmp_path) == [] and _leftovers(ro) == []


def test_out_is_checked_before_any_run(tmp_path):
    calls = []

    @fb.register("counting-problem")
    def counting(seed, device):
        calls.append(seed)
        raise AssertionError("must not run")

    (tmp_path / "afile").write_text("")
    _error(["--problems", "counting-problem", "--optimizers", "lm", "--out", str(tmp_path / "afile")])
    assert calls == []


def test_an_interrupted_run_leaves_no_partial_folder(tmp_path):
    @fb.register("interrupted")
    def interrupted(seed, device):
        raise KeyboardInterrupt

    rc = main(["--problems", "interrupted", "--optimizers", "lm", "--no-progress",
               "--out", str(tmp_path / "rep")])
    assert rc == 130 and list(tmp_path.iterdir()) == []


def test_a_problem_that_fails_to_build_is_reported_with_tuning_on(tmp_path):
    """Building the problem raises: every pair with it is one failed row (no sweep runs at a
    rate the failed run never had), the other problems run, exit status 1."""
    @fb.register("unbuildable")
    def unbuildable(seed, device):
        raise ValueError("no data here")

    out = tmp_path / "rep"
    rc = main(["--problems", "unbuildable,digits-logreg", "--optimizers", "adamw",
               "--steps", "3", "--tune", "on", "--no-progress", "--out", str(out)])
    assert rc == 1
    rows = json.loads((out / "results.json").read_text())["results"]
    bad = [r for r in rows if r["problem"] == "unbuildable"]
    assert bad and all(r["status"] == "failed" and "no data here" in r["reason"] for r in bad)
    assert any(r["problem"] == "digits-logreg" and r["status"] == "ok" for r in rows)


def test_a_report_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """The disk fills up while the report is written (a file-size limit of 8 KiB: the plots
    are bigger): one error line, exit 1, no partial folder, the earlier report untouched."""
    out = tmp_path / "rep"
    assert main(TINY + ["--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, old_limit[1]))
    try:
        msg = _error(TINY + ["--out", str(out), "--seed", "3"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "writing the report failed" in msg and "nothing was replaced" in msg
    assert _leftovers(tmp_path) == [] and (out / "results.json").read_text() == before


# ----------------------------------------------------------------------------- names, numbers


@pytest.mark.parametrize("bad, message", [
    (["--optimizers", ","], "--optimizers ',' names no optimizer"),
    (["--problems", ""], "--problems '' names no problem"),
    (["--problems", " , "], "--problems ' , ' names no problem"),
    (["--optimizers", "lm,lm"], "'lm' more than once"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--device", "mps"], "only cpu and cuda"),
])
def test_bad_names_and_numbers_are_one_line_before_any_work(tmp_path, bad, message):
    args = ["--problems", "nist-misra1a", "--optimizers", "lm", "--no-progress",
            "--out", str(tmp_path / "rep")]
    assert message in _error(args + bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- plugins


def _plugin(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


FIT = """
    import torch, funcopt.bench as fb

    @fb.register("cli-fit")
    def fit(seed, device):
        x = torch.linspace(0, 1, 8, dtype=torch.float64, device=device)
        res = lambda p, batch=None: p["a"] * x - 2 * x
        return fb.Problem(params={"a": torch.zeros((), dtype=torch.float64, device=device)},
                          loss_fn=lambda p, batch=None: 0.5 * res(p).pow(2).sum(),
                          residual_fn=res, batches=lambda step: None, kind="curve-fit",
                          evaluate=lambda p: {"loss": float(res(p).pow(2).sum())}, steps=3)
"""


@pytest.mark.parametrize("spec", ["{dir}/cli_plugin_fit.py", "./cli_plugin_fit.py",
                                  "cli_plugin_fit.py"])
def test_a_plugin_given_as_a_py_file_is_loaded(tmp_path, spec):
    _plugin(tmp_path, "cli_plugin_fit", FIT)
    out = tmp_path / "rep"
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        spec = spec.format(dir=tmp_path)
        rc = main(["--plugin", spec, "--plugin", spec, "--problems", "cli-fit",
                   "--optimizers", "lm", "--no-progress", "--out", str(out)])
    finally:
        os.chdir(old)
    assert rc == 0
    r = _results(out)[("cli-fit", "lm")]
    assert r["status"] == "ok" and r["final"]["loss"] < 1e-12  # a = 2 fits exactly


@pytest.mark.parametrize("body, message", [
    ("raise RuntimeError('plugin boom')", "failed while importing: RuntimeError: plugin boom"),
    ("def f(:\n", "failed while importing: SyntaxError"),
    ("import funcopt.bench as fb\nfb.register('digits-mlp')(lambda seed, device: None)",
     "a problem named 'digits-mlp' is already registered"),
    ("import funcopt.bench as fb\nfb.register_optimizer('adamw')(lambda problem: None)",
     "an optimizer named 'adamw' is already registered"),
    ("import funcopt.bench as fb\nfb.register('a,b')(lambda seed, device: None)",
     "without commas"),
    ("import not_a_module_anywhere", "No module named 'not_a_module_anywhere'"),
])
def test_a_broken_plugin_is_one_line_naming_it(tmp_path, body, message):
    path = _plugin(tmp_path, "cli_plugin_bad", body)
    msg = _error(["--plugin", str(path), "--list"])
    assert message in msg and str(path) in msg


def test_a_plugin_module_that_is_not_there_says_how_to_give_a_file(tmp_path):
    _plugin(tmp_path, "cli_plugin_here", FIT)
    msg = _error(["--plugin", "cli_plugin_here", "--list"], cwd=tmp_path)
    assert "--plugin ./cli_plugin_here.py" in msg
    assert "no such file" in _error(["--plugin", str(tmp_path / "nope.py"), "--list"])
    (tmp_path / "notes.txt").write_text("")
    assert "must be a .py file" in _error(["--plugin", str(tmp_path / "notes.txt"), "--list"])
    assert "is a folder" in _error(["--plugin", f"{tmp_path}/", "--list"])


@pytest.mark.parametrize("argv, message", [
    (["--plugin", "{dir}/syntax.py"], "SyntaxError"),
    (["--out", "{dir}/mine"], "--force"),
])
def test_the_command_prints_one_line_and_no_traceback(tmp_path, argv, message):
    (tmp_path / "syntax.py").write_text("def f(:\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("")
    proc = _python("from funcopt.bench.__main__ import main; import sys; sys.exit(main())",
                   *TINY, *[a.format(dir=tmp_path) for a in argv])
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert (tmp_path / "mine" / "a.txt").exists()


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)


# ----------------------------------------------------------------------------- failed rows


def test_a_problem_or_optimizer_that_fails_to_build_is_a_failed_row(tmp_path):
    @fb.register("raises-on-build")
    def raises(seed, device):
        raise ValueError("no data here")

    @fb.register("not-a-problem")
    def wrong(seed, device):
        return {"params": None}

    @fb.register("unavailable-here")
    def unavailable(seed, device):
        raise fb.Unavailable("needs a GPU")

    @fb.register_optimizer("raises-on-build-opt", default=False)
    def broken(problem):
        raise RuntimeError("bad hyperparameter")

    out = tmp_path / "rep"
    rc = main(["--problems", "raises-on-build,not-a-problem,unavailable-here,nist-misra1a",
               "--optimizers", "lm,raises-on-build-opt", "--steps", "2", "--no-progress",
               "--out", str(out)])
    assert rc == 1
    res = _results(out)
    assert res[("raises-on-build", "lm")]["status"] == "failed"
    assert "building the problem: ValueError: no data here" in res[("raises-on-build", "lm")]["reason"]
    assert "not a funcopt.bench.Problem" in res[("not-a-problem", "lm")]["reason"]
    assert res[("unavailable-here", "lm")]["status"] == "skipped"
    assert res[("nist-misra1a", "raises-on-build-opt")]["reason"] == \
        "building the optimizer: RuntimeError: bad hyperparameter"
    assert res[("nist-misra1a", "lm")]["status"] == "ok"
    assert "no data here" in (out / "report.md").read_text()


def test_a_report_with_no_finished_run_links_no_plots(tmp_path):
    @fb.register("raises-on-build")
    def raises(seed, device):
        raise ValueError("no data here")

    out = tmp_path / "rep"
    assert main(["--problems", "raises-on-build", "--optimizers", "lm", "--no-progress",
                 "--out", str(out)]) == 1
    report = (out / "report.md").read_text()
    assert "No plots: no run finished" in report and ".png" not in report
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.md", "results.json"]


# ----------------------------------------------------------------------------- packages


def test_missing_matplotlib_gives_a_report_without_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "rep"
    assert main(TINY + ["--out", str(out)]) == 0
    assert "no plots" in capsys.readouterr().err
    assert "No plots: matplotlib cannot be imported" in (out / "report.md").read_text()
    assert not (out / "loss_vs_step.png").exists()
    assert _results(out)[("nist-misra1a", "lm")]["status"] == "ok"


def test_a_problem_whose_package_is_missing_is_refused_before_running(tmp_path, capsys):
    @fb.register("needs-nothing-real", requires=("no_such_package_for_funcopt",))
    def needs(seed, device):
        raise AssertionError("must not run")

    msg = _error(["--problems", "needs-nothing-real", "--out", str(tmp_path / "rep")])
    assert "pip install no_such_package_for_funcopt" in msg
    assert list(tmp_path.iterdir()) == []
    assert main(["--list"]) == 0
    assert "needs-nothing-real (needs no_such_package_for_funcopt" in capsys.readouterr().out


def test_mnist1d_is_in_the_bench_extra():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("mnist1d") for r in extras["bench"])
    assert bench_problems.REQUIRES["mnist1d-mlp"] == ("mnist1d",)


def test_mnist1d_problem_runs_when_installed(tmp_path):
    pytest.importorskip("mnist1d")
    out = tmp_path / "rep"
    assert main(["--problems", "mnist1d-mlp", "--optimizers", "adamw", "--steps", "2",
                 "--no-progress", "--out", str(out)]) == 0
    r = _results(out)[("mnist1d-mlp", "adamw")]
    assert r["status"] == "ok" and 0.0 <= r["final"]["accuracy"] <= 1.0


# ----------------------------------------------------------------------------- the test suite


def test_the_suite_keeps_jax_on_the_cpu():
    """tests/conftest.py sets these before jax is imported (unless the user set them), so
    pytest workers on a GPU machine do not each take most of the GPU's memory."""
    assert os.environ["JAX_PLATFORMS"]
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]
    jax = pytest.importorskip("jax")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        assert {d.platform for d in jax.devices()} == {"cpu"}
