"""benchmarks/step_table.py: one command prints the step table as one markdown section.

The script runs for real on the CPU with ``--quick`` (one case, cheap contenders, 2 timed
steps); the tests read the markdown back: its rows and columns, every number a positive float,
the multiple of the floor equal to the time over the floor printed in the column head, the
ratios equal to the quotient of the printed times, and ``--write`` writing the printed text.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def st():
    spec = importlib.util.spec_from_file_location("step_table", ROOT / "benchmarks" / "step_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(text: str, title: str) -> str:
    """The part of ``text`` under the heading ``### title`` (up to the next heading)."""
    return text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]


def tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{first header cell: (header cells, rows of cells)} of every markdown table in ``text``."""
    out, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            out[head[0]] = (head, rows)
    return out


def positive(text: str) -> float:
    value = float(text)
    assert value > 0 and math.isfinite(value), text
    return value


def ms_of(cell: str) -> float:
    assert cell.split(", ")[0].endswith(" ms"), cell
    return positive(cell.split(", ")[0].removesuffix(" ms"))


@pytest.fixture(scope="module")
def quick(st, tmp_path_factory):
    """The printed text and the written file of one quick run of every section."""
    path = tmp_path_factory.mktemp("table") / "steps.md"
    path.write_text("old content that --write replaces\n")
    argv = ["--device", "cpu", "--quick", "--repeat", "2", "--write", str(path)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert st.main(argv) == 0
    return buf.getvalue(), path.read_text(), " ".join(argv)


def test_header_names_device_torch_bandwidth_and_command(quick):
    printed, _, argv = quick
    first, _, command = printed.splitlines()[:3]
    assert first.startswith("## Optimizer steps: ") and f"torch {torch.__version__}" in first
    assert re.search(r"\d{4}-\d\d-\d\d, copy bandwidth ", first)
    positive(re.search(r"copy bandwidth ([0-9.]+) GB/s", first).group(1))
    assert command == f"`python benchmarks/step_table.py {argv}`"


def test_write_replaces_the_file_with_the_printed_text(quick):
    printed, written, _ = quick
    assert written == printed and "old content" not in written


def test_adamw_table_rows_columns_floor_and_ratio(quick):
    head, rows = tables(section(quick[0], "Element-wise steps against torch.optim and the floor"))[
        "AdamW (28 B/param)"]
    assert head[1].startswith("mlp: 85,614 params / 6 tensors, floor ")
    assert head[2] == "time / torch-fused (mlp)"
    floor_ms = positive(re.search(r"floor ([0-9.]+) ms", head[1]).group(1))
    assert [r[0] for r in rows] == ["torch-foreach", "torch-fused", "funcopt-eager", "funcopt-adapter"]
    by = {r[0]: r for r in rows}
    for name, cell, vs in rows:
        _, mult, peak = cell.split(", ")
        ms = ms_of(cell)
        assert mult.endswith("x") and positive(mult[:-1]) == pytest.approx(ms / floor_ms, rel=0.02, abs=0.01)
        assert peak == "-"  # peak memory is measured on CUDA only
        if name.startswith("funcopt"):
            assert positive(vs) == pytest.approx(ms / ms_of(by["torch-fused"][1]), rel=0.02, abs=0.01)
        else:
            assert vs == "-"


def test_heavyball_table_or_note(quick):
    printed = quick[0]
    if importlib.util.find_spec("heavyball") is None:
        assert "_heavyball is not installed (`pip install heavyball`): skipped._" in printed
        return
    head, rows = tables(section(printed, "Muon, SOAP, PSGD Kron against heavyball"))["method"]
    assert head[1].endswith(" eager") and head[1].startswith("heavyball ")
    assert head[2] == "funcopt eager" and head[3].startswith("funcopt / heavyball ")
    assert [r[0] for r in rows] == ["Muon (bf16 Newton-Schulz)"]
    _, hb, fo_cell, vs = rows[0]
    assert hb.endswith(", -") and fo_cell.endswith(", -")
    assert positive(vs) == pytest.approx(ms_of(fo_cell) / ms_of(hb), rel=0.02, abs=0.01)


def test_singd_table_or_note(quick):
    printed = quick[0]
    if importlib.util.find_spec("singd") is None:
        assert "_singd is not installed (`pip install singd`): skipped._" in printed
        return
    head, rows = tables(section(printed, "SINGD and KFAC against the singd package"))["method"]
    assert head == ["method", "step ms", "state MB", "time / singd package"]
    assert [r[0] for r in rows] == ["singd package dense (T=1)", "funcopt singd dense (T=1)",
                                    "funcopt kfac (T=1)", "funcopt kfac (T=10)"]
    assert "MLP 784-64-64-10, batch 64" in printed
    package_ms = positive(rows[0][1])
    assert rows[0][3] == "-"
    for _, ms, mb, vs in rows:
        positive(mb)
        if vs != "-":
            assert positive(vs) == pytest.approx(positive(ms) / package_ms, rel=0.02, abs=0.01)
    # the same preconditioner sizes: dense SINGD's K, C and momenta hold what the package holds
    assert rows[1][2] == rows[0][2]


def test_a_failing_contender_is_a_cell_and_the_run_goes_on(st, monkeypatch, capsys):
    def broken(method):
        def setup(shapes, device):
            raise RuntimeError("CUDA out of memory | tried\nto allocate")
        return setup

    monkeypatch.setattr(st.ss, "funcopt_adapter_setup", broken)
    assert st.main(["--quick", "--repeat", "2", "--sections", "adamw"]) == 0
    head, rows = tables(capsys.readouterr().out)["AdamW (28 B/param)"]
    by = {r[0]: r for r in rows}
    assert by["funcopt-adapter"][1:] == ["failed: RuntimeError: CUDA out of memory / tried to allocate", "-"]
    ms_of(by["funcopt-eager"][1])
    positive(by["funcopt-eager"][2])


@pytest.mark.parametrize("argv, message", [
    (["--sections", "adamw,bogus"], "--sections: unknown or empty ['bogus']"),
    (["--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
])
def test_bad_options_name_the_option(st, argv, message, capsys):
    with pytest.raises(SystemExit):
        st.main(argv)
    assert message in capsys.readouterr().err


def test_floor_seconds_is_bytes_over_bandwidth(st):
    assert st.ss.floor_seconds(10**6, "adamw", 28e6) == pytest.approx(1.0)
    assert st.ss.floor_seconds(10**6, "sgd", 20e6) == pytest.approx(1.0)
    assert math.isnan(st.ss.floor_seconds(10**6, "muon", 1e9))


@pytest.mark.parametrize("method, floor_bytes", [("sgd", 20), ("lion", 20)])
def test_sgd_and_lion_tables(st, method, floor_bytes):
    """SGD-momentum has torch rows and the ratio column; torch.optim has no Lion, so its table
    has funcopt rows only and no ratio column."""
    names = ["torch-foreach", "torch-fused", "funcopt-eager"]
    head, rows = tables("\n".join(st.method_table(method, names, ["mlp"], "cpu", 1e9, 2)))[
        "SGD (momentum 0.9) (20 B/param)" if method == "sgd" else
        "Lion (20 B/param; torch.optim has none)"]
    floor_ms = 85_614 * floor_bytes / 1e9 * 1e3
    assert head[1] == f"mlp: 85,614 params / 6 tensors, floor {floor_ms:.3f} ms"
    assert [r[0] for r in rows] == (names if method == "sgd" else ["funcopt-eager"])
    assert len(head) == (3 if method == "sgd" else 2) and all(len(r) == len(head) for r in rows)
    for row in rows:
        positive(row[1].split(", ")[1].removesuffix("x"))
        ms_of(row[1])
    if method == "sgd":
        assert positive(rows[2][2]) == pytest.approx(ms_of(rows[2][1]) / ms_of(rows[1][1]),
                                                     rel=0.02, abs=0.01)


@pytest.mark.parametrize("x", [120.5, 1.0, 0.1, 0.0999, 0.00365, 1e-5])
def test_ratios_keep_two_digits_and_never_print_zero(st, x):
    """A fast contender next to a stalled torch-fused (a 40 ms step on a shared CPU) has a
    ratio of a few thousandths: it prints as such, not as "0.00"."""
    assert float(st.num(x)) == pytest.approx(x, rel=0.05, abs=0.005 if x >= 0.1 else 0)
    assert st.ratio((0.146e-3, None), (40.005e-3, None)) == "0.0036"
