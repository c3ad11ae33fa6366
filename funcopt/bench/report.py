"""Write the report folder: report.md, results.json and the loss plots, and check the folder
``--out`` can take them. Reading report folders back and merging them (``--merge``) is
:mod:`funcopt.bench.load`."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import statistics
from pathlib import Path

from funcopt.bench.load import RUNS, RUNS_TMP, process_meta
from funcopt.bench.run import Result
from funcopt.bench.suite import EXTEND, Sweep

__all__ = ["MARKER", "REPORT_FILES", "check_out", "plotting_unavailable", "prepare_out",
           "write_report"]

# A report folder holds this marker and nothing but REPORT_FILES: only such a folder (or an
# empty one) is replaced by a new report without --force.
MARKER = ".funcopt-bench-report"
REPORT_FILES = ("report.md", "results.json", "loss_vs_step.png", "loss_vs_time.png",
                "lr_sweep.png")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.3e}"


def _pm(mean: float | None, sd: float | None, digits: int = 4) -> str:
    return _fmt(mean, digits) + ("" if sd is None else f" ± {_fmt(sd, 2)}")


def _size(n: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _target(row: dict, key: str, fmt) -> str:
    if row["target"] is None:
        return "-"
    if not row["reached_target"]:
        return "not reached"
    of = f" ({row['reached_target']}/{row['seeds']})" if row["seeds"] > 1 else ""
    return fmt(row[key]) + of


def summary_table(rows: list[dict]) -> str:
    """The results table: one row per (problem, optimizer), means +- sd over seeds."""
    lines = [
        "| problem | optimizer | lr | test loss | accuracy | steps to target | s to target "
        "| steps | ms/step | train (s) | setup (s) | opt. state | peak mem (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['optimizer']} | {_fmt(r['learning_rate'], 3)} | "
            f"{_pm(r['test_loss'], r['test_loss_sd'])} | "
            f"{'-' if r['accuracy'] is None else _pm(r['accuracy'], r['accuracy_sd'], 3)} | "
            f"{_target(r, 'steps_to_target', lambda v: f'{v:g}')} | "
            f"{_target(r, 'time_to_target_s', lambda v: f'{v:.2f}')} | {r['steps']} | "
            f"{1e3 * r['time_per_step_s']:.2f} | {r['wall_s']:.2f} | {r['setup_s']:.2f} | "
            f"{_size(r['state_bytes'])} | {_fmt(r['peak_mb'], 4)} |")
    return "\n".join(lines)


def not_run(results: list[Result]) -> str:
    """Failures (each with its error), then the pairs that do not apply, one line per reason."""
    lines: list[str] = []
    failed: dict[tuple[str, str], list[str]] = {}
    skipped: dict[str, dict[str, list[str]]] = {}
    for r in results:
        if r.status == "failed":
            failed.setdefault((r.optimizer, r.reason), []).append(f"{r.problem} (seed {r.seed})")
        elif r.status == "skipped":
            skipped.setdefault(r.reason, {}).setdefault(r.optimizer, []).append(r.problem)
    if failed:
        lines += ["", "Failed:", ""]
        lines += [f"- {opt} on {', '.join(where)}: {reason}" for (opt, reason), where in failed.items()]
    if skipped:
        lines += ["", "Not applicable (not run):", ""]
        for reason, by_opt in skipped.items():
            pairs: dict[str, list[str]] = {}
            for opt, probs in by_opt.items():
                pairs.setdefault(", ".join(probs), []).append(opt)
            lines += [f"- {', '.join(opts)} on {probs}: {reason}" for probs, opts in pairs.items()]
    return "\n".join(lines)


def converged_fits(results: list[Result]) -> str:
    """For batched fits (a ``converged`` count in the final numbers): how many fits of each
    finished run ended within a relative 1e-6 of the cost of a reference fit that succeeded."""
    done = [r for r in results if r.status == "ok" and "converged" in r.final]
    if not done:
        return ""
    lines = ["", "Batched fits converged (cost within 1e-6 of a successful "
             "`funcopt.least_squares(..., batched=True)` fit):", ""]
    lines += [f"- {r.problem}, {r.optimizer}, seed {r.seed}: {r.final['converged']:g} of "
              f"{r.final.get('fits', float('nan')):g}" for r in done]
    return "\n".join([*lines, ""])


def markdown_table(results: list[Result]) -> str:
    """The summary table, the converged batched fits and the not-run list, as printed at the
    end of a run."""
    from funcopt.bench.suite import summarise

    return summary_table(summarise(results)) + "\n" + converged_fits(results) + not_run(results)


def sweep_table(sweeps: list[Sweep]) -> str:
    """The learning-rate sweeps: final validation loss at each rate; the chosen one in bold,
    a rate beyond the grid (an extension past a winning end) marked "(+)"."""
    lines: list[str] = []
    for prob in dict.fromkeys(s.problem for s in sweeps):
        lines += [f"\n{prob}:\n", "| optimizer | learning rate: validation loss | chosen |",
                  "| --- | --- | --- |"]
        for s in (s for s in sweeps if s.problem == prob):
            cells = [(f"**{_rate(lr, s)}: {_fmt(v)}**" if lr == s.chosen else
                      f"{_rate(lr, s)}: {'failed' if v is None else _fmt(v)}")
                     for lr, v in zip(s.learning_rates, s.val_loss)]
            chosen = "-" if s.chosen is None else f"{s.chosen:.3g}" + \
                (f" ({s.edge} edge)" if s.edge else "")
            lines.append(f"| {s.optimizer} | {' · '.join(cells)} | {chosen} |")
    return "\n".join(lines)


def _rate(lr: float, s: Sweep) -> str:
    return f"{lr:.3g}" + (" (+)" if lr in s.beyond else "")


def _curves(results: list[Result], prob: str, xkey: str):
    """Per optimizer: x, the mean validation curve over seeds, its lowest and highest seed."""
    by_opt: dict[str, list[Result]] = {}
    for r in results:
        if r.problem == prob and r.status == "ok" and r.curve_eval:
            by_opt.setdefault(r.optimizer, []).append(r)
    for opt, rs in by_opt.items():
        n = min(len(r.curve_eval) for r in rs)
        ys = [[max(r.curve_eval[i], 1e-300) for r in rs] for i in range(n)]
        xs = [statistics.fmean((r.curve_step if xkey == "step" else r.curve_time)[i] for r in rs)
              for i in range(n)]
        yield opt, xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def _axes(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return plt, fig, axes


def _plot(results: list[Result], path: Path, xkey: str) -> None:
    problems = list(dict.fromkeys(r.problem for r in results if r.status == "ok"))
    if not problems:
        return
    plt, fig, axes = _axes(len(problems))
    for ax, prob in zip(axes.flat, problems):
        first = next(r for r in results if r.problem == prob and r.status == "ok")
        for opt, xs, mean, lo, hi in _curves(results, prob, xkey):
            (line,) = ax.plot(xs, mean, label=opt, marker=".", markersize=3)
            if lo != hi:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if first.target is not None:
            ax.axhline(first.target, color="black", linestyle=":", linewidth=1, label="target")
        ax.set_title(prob)
        ax.set_xlabel("step" if xkey == "step" else "training time (s; set-up and evaluation excluded)")
        ax.set_ylabel(f"validation {first.loss_name or 'loss'}")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweeps(sweeps: list[Sweep], results: list[Result], path: Path) -> None:
    problems = list(dict.fromkeys(s.problem for s in sweeps if s.chosen is not None))
    if not problems:
        return
    names = {r.problem: r.loss_name for r in results if r.loss_name}
    plt, fig, axes = _axes(len(problems))
    for ax, prob in zip(axes.flat, problems):
        for s in (s for s in sweeps if s.problem == prob):
            pts = [(lr, v) for lr, v in zip(s.learning_rates, s.val_loss) if v is not None]
            if not pts:
                continue
            (line,) = ax.plot(*zip(*pts), marker="o", markersize=3, label=s.optimizer)
            best = dict(pts).get(s.chosen) if s.chosen is not None else None
            if best is not None:
                ax.plot([s.chosen], [best], marker="*", markersize=12, color=line.get_color())
        ax.set_title(f"{prob} (star: chosen)")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final validation {names.get(prob, 'loss')}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
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


def check_out(out: Path, *, force: bool = False, resume: bool = False) -> None:
    """Raise a ValueError saying why ``out`` cannot take the report, before any work is done.

    The report replaces the folder ``out`` whole, so ``out`` must be a new path, an empty
    folder, or a report this command wrote earlier (it holds the marker file and only report
    files). A folder holding anything else is refused unless ``force`` (its files are then
    deleted). The saved runs of a cut-off command (:data:`RUNS`) are taken when ``resume``, and
    otherwise refused unless ``force``: they may be hours of work. Refused always: the current
    folder or one above it, a symbolic link, an existing file, a path under a file, and a place
    that cannot be written.
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
        if not (force or resume) and any(n in (RUNS, RUNS_TMP) for n in names):
            raise ValueError(f"{out}: holds the saved runs of a command that was cut off ({RUNS}): "
                             "continue it by running that command again with --resume, or pass "
                             "--force to delete them")
        names = [n for n in names if n not in (RUNS, RUNS_TMP)]
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


def prepare_out(out: Path, *, force: bool = False, resume: bool = False) -> Path:
    """Check ``out`` (:func:`check_out`) and create the empty temporary folder, beside it, that
    :func:`write_report` fills; creating it proves the place is writable. The caller removes it
    if the report is never written."""
    check_out(out, force=force, resume=resume)
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
                 force: bool = False, plots: bool = True, sweeps: list[Sweep] | None = None) -> None:
    """Write the report into ``partial`` (a folder from :func:`prepare_out`; made here if None),
    then move it into place as ``out``: a report folder that exists is always complete, and no
    temporary folder is left behind when writing fails. ``out`` is checked again first, since
    files may have appeared there while the runs went on (the command's own saved runs, which
    the report holds now, are replaced with the folder). ``plots=False`` leaves the plots out
    (``meta["no_plots"]`` says why, in the report)."""
    out = Path(out)
    partial = prepare_out(out, force=force) if partial is None else partial
    try:
        _fill(results, list(sweeps or []), partial, meta, plots)
        check_out(out, force=force, resume=True)
        _move_into_place(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _fill(results: list[Result], sweeps: list[Sweep], folder: Path, meta: dict, plots: bool) -> None:
    from funcopt.bench.suite import notes, summarise, winners

    # a merged report brings its pieces' versions and machine; a run takes this process's
    meta = {**process_meta(), **meta}
    rows = summarise(results)
    (folder / MARKER).write_text("Written by python -m funcopt.bench. Running it again with --out "
                                 "naming this folder replaces the folder whole.\n")
    (folder / "results.json").write_text(json.dumps(
        {"meta": meta, "results": [r.to_json() for r in results],
         "sweeps": [s.to_json() for s in sweeps], "summary": rows}, indent=1))
    if not plots:
        figures = (f"\n\nNo plots: {meta.get('no_plots') or 'not asked for'}. "
                   "`pip install 'funcopt[bench]'` installs matplotlib.\n")
    elif not rows:
        figures = "\n\nNo plots: no run finished.\n"
    else:
        _plot(results, folder / "loss_vs_step.png", "step")
        _plot(results, folder / "loss_vs_time.png", "time")
        figures = ("\n\n## Curves\n\nValidation loss along training: the line is the mean over "
                   "seeds, the band spans the lowest and highest seed; the dotted line is the "
                   "target.\n\n![validation loss vs step](loss_vs_step.png)\n\n"
                   "![validation loss vs training time](loss_vs_time.png)\n")
        if any(s.chosen is not None for s in sweeps):
            _plot_sweeps(sweeps, results, folder / "lr_sweep.png")
            figures += "\n![final validation loss vs learning rate](lr_sweep.png)\n"
    body = [_header(meta), "## Results\n", *[f"- {p}: {w}" for p, w in winners(rows).items()],
            "", summary_table(rows), converged_fits(results) + not_run(results), "", _legend(results, meta)]
    extra = notes(results, sweeps)
    if extra:
        body += ["", "## Notes", "", *[f"- {n}" for n in extra]]
    if sweeps:
        body += ["", "## Learning-rate sweeps", "", _sweep_text(meta), sweep_table(sweeps)]
    (folder / "report.md").write_text("\n".join(body) + figures)



def _header(meta: dict) -> str:
    """The title and one paragraph on how the report was made; for a merged report (``meta``
    has ``pieces``), one line per piece: its folder, command, machine, date and time (a run's
    own command is in results.json's meta); for runs taken from cut-off commands (``resumed``),
    one line per such command: which runs, where and when."""
    seeds = meta.get("seeds") or [meta.get("seed", 0)]
    named = f"{meta['device_name']}; " if meta.get("device_name") else ""
    pieces = meta.get("pieces") or []
    host = "" if pieces else f"{meta['machine']}, {meta['cpu_count']} CPUs, "
    text = (f"# funcopt benchmark\n\nSuite {meta.get('suite', '-')}, seeds "
            f"{', '.join(map(str, seeds))}, learning rates "
            f"{'tuned' if meta.get('tune') else 'at their defaults (--tune off)'}, device "
            f"{meta['device']} ({named}{host}{meta.get('threads', 1)} torch thread(s)), torch "
            f"{meta['torch']}, Python {meta['python']}, {meta.get('date', '')}; "
            f"{meta.get('total_s', 0):.0f} s in all")
    resumed = meta.get("resumed") or []
    if resumed:
        text += " (with the runs of the earlier commands below)"
    if not pieces:
        return text + ".\n" + _resumed(resumed)
    text += (f"\n\nMerged from {len(pieces)} report folders (the runs' seconds above are their "
             "sum); each was one command:\n\n")
    return text + "\n".join(
        f"- `{p['folder']}`: `{p['command']}`, {p['device']} ({p['device_name']}; "
        f"{p['machine']}, {p['cpu_count']} CPUs), {p['date']}, {p['total_s']:.0f} s"
        + "".join(f"; {r['runs']} of its runs from a cut-off command of {r['date']}"
                  for r in p.get("resumed") or [])
        for p in pieces) + "\n"


def _resumed(resumed: list[dict]) -> str:
    """The header's lines on runs taken from earlier commands that were cut off (--resume)."""
    if not resumed:
        return ""
    return (f"\n{sum(r['runs'] for r in resumed)} of the runs (a problem, optimizer, seed and "
            "learning rate each) were taken from earlier commands, with the same settings, that "
            "were cut off before their report (`--resume`); their numbers, timings included, were "
            "measured there:\n\n" + "\n".join(
                f"- `{r['command']}`, {r['device']} ({r['device_name']}; {r.get('machine')}, "
                f"{r.get('cpu_count')} CPUs), {r['date']} to {r['until']}, {r['total_s']:.0f} s: "
                f"{r['runs']} runs: {r['which']}" for r in resumed) + "\n")


def _legend(results: list[Result], meta: dict) -> str:
    kinds = sorted({r.memory_kind for r in results if r.status == "ok" and r.memory_kind})
    losses: dict[str, dict[str, None]] = {}  # loss name -> problems (ordered, once each)
    targets: dict[str, float | None] = {}
    for r in results:
        if r.status == "ok":
            losses.setdefault(r.loss_name, {})[r.problem] = None
            targets.setdefault(r.problem, r.target)
    warm = meta.get("warmup", 0)
    lines = [
        "What the columns mean (`-`: does not apply):", "",
        "- lr: the learning rate of the runs: the sweep's choice (below), or the optimizer's "
        "default with `--tune off`; `-` for a method with none (Levenberg-Marquardt damps "
        "itself).",
        "- test loss, accuracy: on held-out test data at the end, the mean ± sample standard "
        "deviation over seeds (no ± with one seed). The loss is "
        + "; ".join(f"{name} for {', '.join(probs)}" for name, probs in losses.items())
        + ". Curve fits have no held-out data: their loss is on all the points.",
        f"- steps to target, s to target: the first evaluation (every 1/{meta.get('evals', 20)} "
        "of the steps) at "
        "which the validation loss is at or below the problem's target, as steps and as "
        "training seconds; the median over the seeds that reached it (how many, of all, in "
        "brackets). Targets: " + ", ".join(f"{p} {_fmt(t)}" for p, t in targets.items()
                                            if t is not None) + ".",
        "- steps: timed optimizer steps. ms/step: the median time of one step (a median, so a "
        "busy machine's pauses do not count). train (s): the sum of the step times (mean over "
        "seeds): evaluations are not in it.",
        f"- setup (s): building the problem and the optimizer and {warm} untimed warm-up "
        "steps on a copy of the parameters (first-call costs), not counted in train.",
        "- opt. state: the bytes of the optimizer state's tensors.",
        "- peak mem (MB): " + ("; ".join(kinds) if kinds else "-") + ". On a CPU this "
        "includes the Python process and its libraries (a few hundred MB), so compare the "
        "differences between rows.",
    ]
    return "\n".join(lines)


def _sweep_text(meta: dict) -> str:
    grid = meta.get("grid") or []
    return ("Each optimizer with a learning rate ran at every point of the grid "
            + " · ".join(f"{m:.3g}" for m in grid)
            + " times its default, with the first seed and the full step budget (the same "
              "rule for every optimizer); the rate with the lowest final validation loss "
              "was chosen (bold), and that run is also the first seed's result. When the "
              "chosen rate was the grid's smallest or largest, the grid was extended one step "
              f"further that way, up to {EXTEND} times per optimizer (those rates are marked "
              "(+)); \"edge\" means the choice is still the end of the rates tried.")


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
