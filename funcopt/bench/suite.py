"""The protocol over many runs: learning-rate tuning, seeds, and the summary the report shows.

Tuning (as DeepOBS's protocol, with the same rule and budget for every optimizer): an optimizer
registered with a default learning rate ``lr0`` (``register_optimizer(..., lr=lr0)``) is run at
every point of a log grid ``lr0 * problem.lr_scale * m`` (``m`` in :data:`GRIDS`), with the
first seed and the problem's full step count; the point with the lowest final *validation*
loss is chosen (runs that fail or end non-finite are not chosen). When the chosen point is the
grid's smallest (largest) rate, the grid is extended one step further that way (the grid's own
multiplier step, half a decade) and the choice is made again, at most :data:`EXTEND` (2) times
per optimizer: the budget is "the grid's points, plus up to 2 beyond an end that wins", the
same rule for every optimizer, so that the chosen rate is bracketed by worse ones wherever 2
steps suffice. That chosen run is also the first seed's result; the other seeds rerun the
chosen rate. Methods without a learning rate
(Levenberg-Marquardt) and ``--tune off`` run the default rate. Test numbers never pick anything.

Seeds: every (problem, optimizer) runs with ``seeds`` (``--seed``, ``--seed + 1``, ...); a
seed changes the initial parameters, the data split (where the problem splits by seed) and the
batch order. The summary gives the mean and the sample standard deviation over seeds, and
calls a problem's best optimizer a win only when the two optimizers' mean +- one standard
deviation intervals do not overlap (and never from one seed).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from funcopt.bench.optimizers import LEARNING_RATES
from funcopt.bench.run import WARMUP_STEPS, Result, run_one

__all__ = ["EVALS", "EXTEND", "GRIDS", "SEEDS", "Sweep", "run_suite", "summarise", "winners"]

# learning-rate multipliers around each optimizer's default: half-decade steps
GRIDS = {"quick": (10 ** -0.5, 1.0, 10 ** 0.5),
         "full": (0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0)}
EXTEND = 2  # at most this many rates beyond the grid's end, when that end wins
SEEDS = {"quick": 1, "full": 3}  # default --seeds of each suite
EVALS = {"quick": 10, "full": 20}  # validations along a run (and for the time to target)

# run_suite's ``saved``: (problem, optimizer, seed, learning rate or None, the run) -> result
Saved = Callable[[str, str, int, float | None, Callable[[], Result]], Result]


@dataclass
class Sweep:
    """One optimizer's learning-rate sweep on one problem (first seed, validation loss).

    ``learning_rates`` (ascending) holds the grid's rates and those it was extended by, which
    are also listed in ``beyond``; ``edge`` is "lower" / "upper" when the chosen rate is still
    the smallest / largest tried after the extensions, else ""."""

    problem: str
    optimizer: str
    learning_rates: list[float]
    val_loss: list[float | None]  # None: the run failed or ended non-finite
    chosen: float | None = None
    edge: str = ""
    beyond: list[float] = field(default_factory=list)  # rates tried past the grid's ends

    def to_json(self) -> dict:
        return asdict(self)


def run_suite(problems: list[str], optimizers: list[str], *, seeds: list[int], tune: bool,
              grid: tuple[float, ...], device: torch.device, steps: int | None = None,
              warmup: int = WARMUP_STEPS, evals: int = 20,
              progress: Callable[[str], None] = lambda s: None,
              saved: Saved | None = None) -> tuple[list[Result], list[Sweep]]:
    """Run every pair (tuned when ``tune``, then every seed); return the per-seed results
    (first seed first) and the sweeps. ``progress(label)`` is called before every run.

    ``saved(problem, optimizer, seed, lr, run)``, when given, makes every run: it returns the
    result of that run saved by an earlier, cut-off command (``--resume``), or calls ``run()``
    and saves what it returns. The runs asked for, and so the sweeps' choices, are the same
    either way: each depends only on the results before it."""
    results: list[Result] = []
    sweeps: list[Sweep] = []

    def run(prob: str, opt: str, seed: int, lr: float | None) -> Result:
        progress(f"{prob} / {opt}" + (f" lr {lr:.3g}" if lr is not None else "") + f" seed {seed}")

        def one() -> Result:
            return run_one(prob, opt, seed=seed, device=device, steps=steps, lr=lr,
                           warmup=warmup, evals=evals)

        return one() if saved is None else saved(prob, opt, seed, lr, one)

    for prob in problems:
        for opt in optimizers:
            first = run(prob, opt, seeds[0], None)
            # a problem that failed to build ran at no rate: nothing to sweep
            if (tune and opt in LEARNING_RATES and first.status != "skipped"
                    and first.learning_rate is not None):
                first, sweep = _tune(first, grid, functools.partial(run, prob, opt, seeds[0]))
                sweeps.append(sweep)
            results.append(first)
            if first.status == "skipped":
                continue
            lr = first.learning_rate
            results += [run(prob, opt, s, lr) for s in seeds[1:]]
    return results, sweeps


def _tune(at_default: Result, grid: tuple[float, ...], run: Callable[[float], Result]):
    """Run the grid around ``at_default``'s rate (reusing it for multiplier 1), then extend it
    past an end that wins (:data:`EXTEND`); pick by the final validation loss."""
    lr0 = at_default.learning_rate
    assert lr0 is not None
    mults = sorted(grid)
    runs = [at_default if m == 1.0 else run(lr0 * m) for m in mults]
    beyond: list[float] = []
    while True:
        val = [r.final_val.get("loss") if r.status == "ok" else None for r in runs]
        ok = [i for i, v in enumerate(val) if v is not None]
        best = min(ok, key=lambda i: val[i]) if ok else None  # type: ignore[arg-type,return-value]
        end = "lower" if best == 0 else "upper" if best == len(runs) - 1 else ""
        if not end or len(beyond) == EXTEND or len(mults) < 2:
            break
        m = mults[0] ** 2 / mults[1] if end == "lower" else mults[-1] ** 2 / mults[-2]
        r = run(lr0 * m)
        beyond.append(lr0 * m)
        mults, runs = ([m, *mults], [r, *runs]) if end == "lower" else ([*mults, m], [*runs, r])
    sweep = Sweep(at_default.problem, at_default.optimizer, [lr0 * m for m in mults], val,
                  beyond=beyond)
    if best is None:
        at_default.reason = (f"every learning rate of the sweep failed; at the default "
                             f"{lr0:.3g}: {at_default.reason}")[:300]
        return at_default, sweep
    sweep.chosen = runs[best].learning_rate
    sweep.edge = end
    return runs[best], sweep


# --------------------------------------------------------------------------- summary


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(results: list[Result]) -> list[dict]:
    """One row per (problem, optimizer) over its finished seeds: mean and sd of the test loss,
    accuracy and validation loss; medians of the timings and of the time to target."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups.setdefault((r.problem, r.optimizer), []).append(r)
    rows = []
    for (prob, opt), rs in groups.items():
        loss = _mean_sd([r.final["loss"] for r in rs])
        acc = _mean_sd([r.final["accuracy"] for r in rs if "accuracy" in r.final])
        val = _mean_sd([r.final_val["loss"] for r in rs])
        hit = [r for r in rs if r.steps_to_target is not None]
        rows.append({
            "problem": prob, "optimizer": opt, "seeds": len(rs),
            "learning_rate": rs[0].learning_rate, "schedule": rs[0].schedule,
            "batch_size": rs[0].batch_size, "loss_name": rs[0].loss_name,
            "test_loss": loss[0], "test_loss_sd": loss[1], "accuracy": acc[0], "accuracy_sd": acc[1],
            "val_loss": val[0], "val_loss_sd": val[1], "steps": rs[0].steps,
            "target": rs[0].target, "reached_target": len(hit),
            "steps_to_target": _median([r.steps_to_target for r in hit]),  # type: ignore[misc]
            "time_to_target_s": _median([r.time_to_target_s for r in hit]),  # type: ignore[misc]
            "wall_s": statistics.fmean(r.wall_s for r in rs),
            "time_per_step_s": _median([r.time_per_step_s for r in rs]),
            "setup_s": statistics.fmean(r.setup_s for r in rs),
            "state_bytes": rs[0].state_bytes,
            "peak_mb": max((r.peak_mb for r in rs if r.peak_mb is not None), default=None),
        })
    return rows


def winners(rows: list[dict]) -> dict[str, str]:
    """Per problem, one sentence: the optimizer with the lowest mean test loss is called the
    winner only when its mean +- sd interval lies below every other's; otherwise the ones whose
    intervals overlap it are named as tied. With one seed there is no spread: no winner."""
    out: dict[str, str] = {}
    for prob in dict.fromkeys(r["problem"] for r in rows):
        rs = sorted((r for r in rows if r["problem"] == prob), key=lambda r: r["test_loss"])
        best = rs[0]
        if len(rs) == 1:
            out[prob] = f"only {best['optimizer']} ran."
        elif best["seeds"] < 2 or best["test_loss_sd"] is None:
            out[prob] = (f"lowest test loss: {best['optimizer']}; one seed gives no spread, so "
                         "no winner is called (use --seeds 3).")
        else:
            hi = best["test_loss"] + best["test_loss_sd"]
            tied = [r["optimizer"] for r in rs[1:]
                    if r["test_loss"] - (r["test_loss_sd"] or 0.0) <= hi]
            out[prob] = (f"{best['optimizer']} wins (its mean + sd is below every other's "
                         "mean - sd)." if not tied else
                         f"no clear winner: {', '.join([best['optimizer'], *tied])} are within "
                         "one standard deviation of each other.")
    return out


def notes(results: list[Result], sweeps: list[Sweep]) -> list[str]:
    """Remarks a reader needs: held-out loss that rose while training went on (overfitting:
    nothing here stops early) and chosen learning rates still at the edge of the rates tried
    (the grid and its extensions)."""
    out = []
    seen = set()
    for r in results:
        if r.status != "ok" or (r.problem, r.optimizer) in seen or len(r.curve_eval) < 3:
            continue
        seen.add((r.problem, r.optimizer))
        i = min(range(len(r.curve_eval)), key=r.curve_eval.__getitem__)
        low, last = r.curve_eval[i], r.curve_eval[-1]
        if math.isfinite(last) and last > 1.1 * low and last - low > 0.02:
            train = r.final.get("train_loss")
            out.append(f"{r.optimizer} on {r.problem}: the validation loss rose from "
                       f"{low:.3g} (step {r.curve_step[i]}) to {last:.3g} at the end"
                       + (f" while the training loss fell to {train:.3g}" if train is not None else "")
                       + ": it overfits, and this benchmark does not stop early.")
    for s in sweeps:
        if s.edge:
            past = f", also after {len(s.beyond)} rates beyond it" if s.beyond else ""
            out.append(f"{s.optimizer} on {s.problem}: the chosen learning rate {s.chosen:.3g} "
                       f"is the grid's {s.edge} end{past}; a "
                       f"{'smaller' if s.edge == 'lower' else 'larger'} one might do better.")
    return out
