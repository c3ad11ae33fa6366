"""``python -m funcopt.bench --merge``: report folders run in pieces give one report, the one a
single run of all the pieces writes; pieces that cannot be combined honestly are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from funcopt.bench.__main__ import main
from funcopt.bench.report import MARKER

PIECE = ["--problems", "digits-logreg", "--steps", "4", "--seeds", "2", "--no-progress"]
# the timing columns of the summary table (0-based, after the leading "|"): s to target,
# ms/step, train (s), setup (s), peak mem; and the per-seed fields that hold times
TIMED_COLUMNS = (7, 9, 10, 11, 13)
TIMED_FIELDS = ("setup_s", "wall_s", "time_per_step_s", "time_to_target_s", "curve_time",
                "peak_mb")


@pytest.fixture(scope="module")
def pieces(tmp_path_factory) -> dict[str, Path]:
    """Two pieces (adamw; sgd-momentum), and a single run of both, each with a sweep."""
    root = tmp_path_factory.mktemp("pieces")
    runs = {"a": ["--optimizers", "adamw"], "b": ["--optimizers", "sgd-momentum"],
            "single": ["--optimizers", "sgd-momentum,adamw"]}
    for name, extra in runs.items():
        assert main([*PIECE, *extra, "--out", str(root / name)]) == 0
    return {name: root / name for name in runs}


def _json(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg
    return msg


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of the report ``src`` whose results.json ``edit(data)`` changed."""
    shutil.copytree(src, dst)
    if edit is not None:
        data = _json(dst)
        edit(data)
        (dst / "results.json").write_text(json.dumps(data))
    return dst


def _untimed(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMED_FIELDS} for r in results]


def _body(report: str) -> list[str]:
    """report.md from its Results section on, the timing cells of the table blanked."""
    lines = report[report.index("## Results"):].splitlines()
    out = []
    for line in lines:
        cells = line.split("|")
        if line.startswith("| digits-logreg |"):
            cells = ["" if i in TIMED_COLUMNS else c for i, c in enumerate(cells)]
        out.append("|".join(cells))
    return out


def test_merge_is_the_union_of_the_pieces(pieces, tmp_path):
    out = tmp_path / "merged"
    assert main(["--merge", str(pieces["a"]), str(pieces["b"]), "--out", str(out)]) == 0
    a, b, merged = _json(pieces["a"]), _json(pieces["b"]), _json(out)
    # rows in the suite's order (sgd-momentum before adamw), each pair's seeds in order
    assert merged["results"] == b["results"] + a["results"]
    assert [r["seed"] for r in merged["results"]] == [0, 1, 0, 1]
    assert merged["sweeps"] == b["sweeps"] + a["sweeps"] and len(merged["sweeps"]) == 2
    assert merged["summary"] == b["summary"] + a["summary"]
    assert merged["meta"]["optimizers"] == ["sgd-momentum", "adamw"]
    assert merged["meta"]["total_s"] == pytest.approx(a["meta"]["total_s"] + b["meta"]["total_s"])
    assert [p["folder"] for p in merged["meta"]["pieces"]] == [str(pieces["a"]), str(pieces["b"])]
    # each piece's table row and sweep row appears, unchanged, in the merged report
    report = (out / "report.md").read_text()
    for piece, opt in ((pieces["a"], "adamw"), (pieces["b"], "sgd-momentum")):
        own = (piece / "report.md").read_text().splitlines()
        rows = [line for line in own if line.startswith((f"| digits-logreg | {opt} |",
                                                         f"| {opt} |"))]
        assert len(rows) == 2 and all(row in report.splitlines() for row in rows)
        meta = _json(piece)["meta"]
        assert f"`{meta['command']}`" in report and meta["date"] in report
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pieces["a"].iterdir())
    assert (out / MARKER).is_file()


def test_merge_writes_the_single_runs_report(pieces, tmp_path):
    """Apart from the header and the measured times, the merged report is the single run's."""
    out = tmp_path / "merged"
    assert main(["--merge", str(pieces["b"]), str(pieces["a"]), "--out", str(out)]) == 0
    single, merged = _json(pieces["single"]), _json(out)
    assert _untimed(merged["results"]) == _untimed(single["results"])
    assert merged["sweeps"] == single["sweeps"]
    for key in ("suite", "seeds", "tune", "grid", "evals", "warmup", "steps", "problems",
                "optimizers", "device", "device_name", "threads", "torch", "python"):
        assert merged["meta"][key] == single["meta"][key], key
    assert _body((out / "report.md").read_text()) == \
        _body((pieces["single"] / "report.md").read_text())


def test_a_merged_report_merges_again(pieces, tmp_path):
    """Pieces can be merged as they come: a merged report is itself a piece, and the header
    still lists the original commands."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main(["--merge", str(pieces["a"]), "--out", str(once)]) == 0
    assert main(["--merge", str(once), str(pieces["b"]), "--out", str(twice)]) == 0
    a, b, again = _json(pieces["a"]), _json(pieces["b"]), _json(twice)
    for key in ("results", "sweeps", "summary"):
        assert again[key] == b[key] + a[key]
    assert [(p["folder"], p["command"]) for p in again["meta"]["pieces"]] == \
        [(str(pieces["a"]), a["meta"]["command"]), (str(pieces["b"]), b["meta"]["command"])]
    assert f"`{a['meta']['command']}`" in (twice / "report.md").read_text()
    msg = _error(["--merge", str(once), str(pieces["a"]), "--out", str(tmp_path / "m")])
    assert "adamw on digits-logreg" in msg


def _set(path: str, value):
    def edit(data):
        *keys, last = path.split(".")
        node = data
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return edit


@pytest.mark.parametrize("field, value", [
    ("device_name", "NVIDIA H100 80GB HBM3"), ("device", "cuda"), ("torch", "1.0.0+other"),
    ("python", "2.7.18"), ("suite", "full"), ("seeds", [0, 1, 2]), ("tune", False),
    ("steps", 8),
])
def test_pieces_that_differ_are_refused(pieces, tmp_path, field, value):
    other = _copy(pieces["b"], tmp_path / "other", _set(f"meta.{field}", value))
    out = tmp_path / "merged"
    msg = _error(["--merge", str(pieces["a"]), str(other), "--out", str(out)])
    assert str(other) in msg and f"{field} " in msg and repr(value) in msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_piece_from_before_the_grid_extension_is_refused(pieces, tmp_path):
    """A report written before the learning-rate grid was extended past a winning end has no
    meta.extend: it reads as 0 and is not merged with one of today's (whose sweeps may hold
    extended rates), where the merged report would claim the extension for both."""
    def old(data):
        del data["meta"]["extend"]
        for sweep in data["sweeps"]:
            sweep.pop("beyond", None)

    other = _copy(pieces["b"], tmp_path / "other", old)
    out = tmp_path / "merged"
    msg = _error(["--merge", str(pieces["a"]), str(other), "--out", str(out)])
    assert str(other) in msg and "extend 0" in msg and not out.exists()
    both = _copy(pieces["a"], tmp_path / "older_a", old)
    assert main(["--merge", str(both), str(other), "--out", str(out)]) == 0  # two old pieces


def test_different_steps_on_different_problems_merge(pieces, tmp_path):
    """--steps must agree per problem only: the table shows each row's steps."""
    def other_problem(data):
        data["meta"]["problems"], data["meta"]["steps"] = ["digits-mlp"], 8
        for r in data["results"] + data["sweeps"] + data["summary"]:
            r["problem"] = "digits-mlp"
    other = _copy(pieces["b"], tmp_path / "other", other_problem)
    out = tmp_path / "merged"
    assert main(["--merge", str(other), str(pieces["a"]), "--out", str(out)]) == 0
    meta = _json(out)["meta"]
    assert meta["steps"] == {"digits-logreg": 4, "digits-mlp": 8}
    assert meta["problems"] == ["digits-logreg", "digits-mlp"]


def test_a_pair_in_two_pieces_is_refused(pieces, tmp_path):
    again = _copy(pieces["a"], tmp_path / "again")
    msg = _error(["--merge", str(pieces["a"]), str(again), "--out", str(tmp_path / "m")])
    assert str(again) in msg and "adamw on digits-logreg" in msg and str(pieces["a"]) in msg
    msg = _error(["--merge", str(pieces["a"]), str(pieces["a"]), "--out", str(tmp_path / "m")])
    assert "named twice" in msg


@pytest.mark.parametrize("edit, expected", [
    (lambda folder: (folder / "results.json").unlink(), "no results.json"),
    (lambda folder: (folder / "results.json").write_text('{"meta": {"suite": '), "corrupt"),
    (lambda folder: (folder / "results.json").write_text("[]"), "not a JSON object"),
    (lambda folder: shutil.rmtree(folder), "no such folder"),
])
def test_a_folder_that_is_not_a_complete_report_is_refused(pieces, tmp_path, edit, expected):
    bad = _copy(pieces["b"], tmp_path / "bad")
    edit(bad)
    msg = _error(["--merge", str(pieces["a"]), str(bad), "--out", str(tmp_path / "m")])
    assert str(bad) in msg and expected in msg


@pytest.mark.parametrize("path, value, expected", [
    ("meta.device_name", None, "meta.device_name"),
    ("results.0.curve_eval", "x", "results[0].curve_eval"),
    ("results.1.final", {"accuracy": 0.5}, "results[1] finished but has no final"),
    ("results.0.optimizer", "lion", "lion on digits-logreg"),
    ("sweeps.0.val_loss", [1.0, "nan"], "sweeps[0].val_loss"),
])
def test_a_corrupt_results_json_is_refused(pieces, tmp_path, path, value, expected):
    def edit(data):
        if value is None:
            del data["meta"]["device_name"]
        else:
            _set(path, value)(data)
    bad = _copy(pieces["b"], tmp_path / "bad", edit)
    msg = _error(["--merge", str(bad), str(pieces["a"]), "--out", str(tmp_path / "m")])
    assert str(bad) in msg and "corrupt" in msg and expected in msg


@pytest.mark.parametrize("extra, expected", [
    (["--problems", "digits-mlp"], "--problems does not apply"),
    (["--device", "cuda"], "--device does not apply"),
    (["--tune", "off"], "--tune does not apply"),
])
def test_run_options_with_merge_are_refused(pieces, tmp_path, extra, expected):
    msg = _error(["--merge", str(pieces["a"]), str(pieces["b"]), *extra,
                  "--out", str(tmp_path / "m")])
    assert expected in msg


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_naming_or_holding_a_piece_is_refused(pieces, force):
    for out in (pieces["b"], pieces["b"].parent):
        msg = _error(["--merge", str(pieces["a"]), str(pieces["b"]), "--out", str(out), *force])
        assert "one of the --merge folders or holds one" in msg
    assert (pieces["b"] / "results.json").is_file() and (pieces["a"] / "results.json").is_file()


def test_a_folder_of_other_files_as_out_is_refused_before_loading(pieces, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    msg = _error(["--merge", str(pieces["a"]), str(tmp_path / "missing"), "--out", str(mine)])
    assert "--force" in msg and "notes.txt" in msg  # not the missing piece: --out comes first
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_piece_from_the_extension_before_meta_recorded_it_reads_as_extend_2(pieces, tmp_path):
    """Reports written by the first version of the grid extension (always at most 2 rates, the
    sweeps carrying ``beyond``) but before meta.extend existed merge with today's pieces of
    extend 2, and not with pieces run without the extension."""
    def unrecorded(data):
        del data["meta"]["extend"]

    first = _copy(pieces["b"], tmp_path / "first", unrecorded)
    out = tmp_path / "merged"
    assert main(["--merge", str(pieces["a"]), str(first), "--out", str(out)]) == 0
    none = _copy(pieces["a"], tmp_path / "none", _set("meta.extend", 0))
    msg = _error(["--merge", str(none), str(first), "--out", str(tmp_path / "m2")])
    assert str(first) in msg and "extend" in msg
