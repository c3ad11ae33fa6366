"""Write the report folder: report.md, results.json and the loss plots."""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import shutil
from pathlib import Path

import torch

from funcopt.bench.run import Result

__all__ = ["MARKER", "REPORT_FILES", "check_out", "plotting_unavailable", "prepare_out",
           "write_report"]

# A report folder holds this marker and nothing but REPORT_FILES: only such a folder (or an
# empty one) is replaced by a new report without --force.
MARKER = ".funcopt-bench-report"
REPORT_FILES = ("report.md", "results.json", "loss_vs_step.png", "loss_vs_time.png")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.3e}"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| problem | optimizer | final loss | accuracy | steps | wall (s) | state (MB) | peak (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.status != "ok":
            continue
        acc = r.final.get("accuracy")
        lines.append(
            f"| {r.problem} | {r.optimizer} | {_fmt(r.final.get('loss'))} | "
            f"{'-' if acc is None else f'{acc:.3f}'} | {r.steps} | {r.wall_s:.2f} | "
            f"{r.state_mb:.3f} | {_fmt(r.peak_mb)} |"
        )
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        if r.status != "ok":
            groups.setdefault((r.status, r.optimizer, r.reason), []).append(r.problem)
    if groups:
        lines += ["", "Not run or failed:", ""]
        lines += [f"- {opt} on {', '.join(probs)}: {status} ({reason})"
                  for (status, opt, reason), probs in groups.items()]
    return "\n".join(lines)


def _plot(results: list[Result], path: Path, xkey: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r.problem for r in results if r.status == "ok"))
    if not problems:
        return
    cols = min(3, len(problems))
    rows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, prob in zip(axes.flat, problems):
        for r in results:
            if r.problem == prob and r.status == "ok":
                xs = r.curve_step if xkey == "step" else r.curve_time
                ys = [max(y, 1e-300) for y in r.curve_eval]
                ax.plot(xs, ys, label=r.optimizer, marker=".", markersize=3)
        ax.set_title(prob)
        ax.set_xlabel("step" if xkey == "step" else "wall time (s, evaluation excluded)")
        ax.set_ylabel("eval loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(problems):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plotting_unavailable() -> str | None:
    """Why the loss plots cannot be drawn here (matplotlib missing or broken), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception as e:  # missing, or an install that fails on import
        return f"matplotlib cannot be imported ({type(e).__name__}: {e})"
    return None


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as e:
        raise ValueError(f"{folder}: cannot be read ({e.strerror})") from None


def check_out(out: Path, *, force: bool = False) -> None:
    """Raise a ValueError saying why ``out`` cannot take the report, before any work is done.

    The report replaces the folder ``out`` whole, so ``out`` must be a new path, an empty
    folder, or a report this command wrote earlier (it holds the marker file and only report
    files). A folder holding anything else is refused unless ``force`` (its files are then
    deleted). Refused always: the current folder or one above it, a symbolic link, an existing
    file, a path under a file, and a place that cannot be written.
    """
    out = Path(out)
    full, here = out.resolve(), Path.cwd().resolve()
    if full == here or full in here.parents:
        raise ValueError(f"{out}: is the current folder or one above it, and the report replaces "
                         "its folder whole; name a new folder, e.g. --out bench-report")
    if out.is_symlink():
        raise ValueError(f"{out}: is a symbolic link; give the folder it points to, or a new name")
    parent = next(p for p in full.parents if p.exists()) if not full.exists() else full.parent
    if not parent.is_dir():
        raise ValueError(f"{out}: is under {parent}, which is a file, not a folder")
    if full.exists():
        if not full.is_dir():
            raise ValueError(f"{out}: is an existing file, and the report is a folder; "
                             "name a new folder, or move the file away")
        names = _entries(full)
        others = [n for n in names if n not in (MARKER, *REPORT_FILES)]
        if names and not force and (MARKER not in names or others):
            shown = ", ".join((others or names)[:3]) + ", ..." * (len(others or names) > 3)
            what = "files a report does not write" if MARKER in names else \
                f"files and no {MARKER} marker, so it is not an earlier report"
            raise ValueError(f"{out}: is a folder with {what} ({shown}). The report replaces the "
                             "folder whole: name a new or empty folder, or pass --force to delete them")
        if not os.access(full, os.W_OK | os.X_OK):
            raise ValueError(f"{out}: is read-only, so its old contents cannot be replaced")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot be written: {parent} is read-only")


def prepare_out(out: Path, *, force: bool = False) -> Path:
    """Check ``out`` (:func:`check_out`) and create the empty temporary folder, beside it, that
    :func:`write_report` fills; creating it proves the place is writable. The caller removes it
    if the report is never written."""
    check_out(out, force=force)
    full = Path(out).resolve()
    try:
        full.parent.mkdir(parents=True, exist_ok=True)
        while True:  # a new name, never a folder someone else made (mode as umask says)
            partial = full.with_name(f"{full.name}.{secrets.token_hex(4)}.partial")
            try:
                partial.mkdir()
                return partial
            except FileExistsError:
                continue
    except OSError as e:
        raise ValueError(f"{out}: cannot be written ({e.strerror}: {e.filename})") from None


def write_report(results: list[Result], out: Path, meta: dict, *, partial: Path | None = None,
                 force: bool = False, plots: bool = True) -> None:
    """Write the report into ``partial`` (a folder from :func:`prepare_out`; made here if None),
    then move it into place as ``out``: a report folder that exists is always complete, and no
    temporary folder is left behind when writing fails. ``out`` is checked again first, since
    files may have appeared there while the runs went on. ``plots=False`` leaves the two plots
    out (``meta["no_plots"]`` says why, in the report)."""
    out = Path(out)
    partial = prepare_out(out, force=force) if partial is None else partial
    try:
        _fill(results, partial, meta, plots)
        check_out(out, force=force)
        _move_into_place(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _fill(results: list[Result], folder: Path, meta: dict, plots: bool) -> None:
    meta = {
        **meta,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    (folder / MARKER).write_text("Written by python -m funcopt.bench. Running it again with --out "
                                 "naming this folder replaces the folder whole.\n")
    (folder / "results.json").write_text(json.dumps({"meta": meta, "results": [r.to_json() for r in results]}, indent=1))
    if not plots:
        tail = (f"\n\nNo plots: {meta.get('no_plots') or 'not asked for'}. "
                "`pip install 'funcopt[bench]'` installs matplotlib.\n")
    elif not any(r.status == "ok" for r in results):
        tail = "\n\nNo plots: no run finished.\n"
    else:
        _plot(results, folder / "loss_vs_step.png", "step")
        _plot(results, folder / "loss_vs_time.png", "time")
        tail = "\n\n![loss vs step](loss_vs_step.png)\n\n![loss vs time](loss_vs_time.png)\n"
    header = (
        f"# funcopt benchmark\n\nseed {meta['seed']}, device {meta['device']}, torch {meta['torch']}, "
        f"{meta['cpu_count']} CPUs. Final loss and accuracy are on held-out data (curve fits: the "
        "residual sum of squares). Wall time counts optimizer steps only.\n\n"
    )
    (folder / "report.md").write_text(header + markdown_table(results) + tail)


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``; an old ``out`` is renamed aside first and deleted last,
    and put back if the rename fails."""
    if not out.exists():
        os.rename(partial, out)
        return
    old = partial.with_name(partial.name[: -len(".partial")] + ".old")
    os.rename(out, old)
    try:
        os.rename(partial, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
