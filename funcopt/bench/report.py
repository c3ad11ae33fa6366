"""Write the report folder: report.md, results.json and the loss plots."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

from funcopt.bench.run import Result

__all__ = ["write_report"]


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


def write_report(results: list[Result], out: Path, meta: dict) -> None:
    """Write into a temporary sibling folder, then move it into place: a report folder that
    exists is always complete."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {
        **meta,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    (tmp / "results.json").write_text(json.dumps({"meta": meta, "results": [r.to_json() for r in results]}, indent=1))
    _plot(results, tmp / "loss_vs_step.png", "step")
    _plot(results, tmp / "loss_vs_time.png", "time")
    header = (
        f"# funcopt benchmark\n\nseed {meta['seed']}, device {meta['device']}, torch {meta['torch']}, "
        f"{meta['cpu_count']} CPUs. Final loss and accuracy are on held-out data (curve fits: the "
        "residual sum of squares). Wall time counts optimizer steps only.\n\n"
    )
    plots = "\n\n![loss vs step](loss_vs_step.png)\n\n![loss vs time](loss_vs_time.png)\n"
    (tmp / "report.md").write_text(header + markdown_table(results) + plots)
    if out.exists():
        _rmtree(out)
    tmp.rename(out)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
