"""``python -m funcopt.bench``: run a suite of problems x optimizers and write a report folder.

``--suite quick`` (the default, ``make demo``): the quick problems, one seed, a 3-point
learning-rate sweep per optimizer. ``--suite full``: larger problems, 3 seeds, a 5-point sweep
(meant for ``--device cuda``). A sweep whose best rate is an end of its grid goes up to 2 points
further that way (``funcopt.bench.suite.EXTEND``). ``--problems``, ``--seeds`` and ``--tune`` override the suite's.

In pieces: a suite too long for one command runs as several, each with its own ``--problems``
and ``--optimizers`` (the other options the same) into its own ``--out`` folder; then
``--merge DIR [DIR ...] --out REPORT`` writes the one report those runs make together, running
nothing: its tables, sweeps, plots and results.json are a single run's, and its header lists
each piece's command, device and date. It refuses pieces that cannot be combined honestly:
different devices, torch or Python versions, suite, seeds, tuning, warm-up or threads, a
problem with a different ``--steps`` in two pieces, or a (problem, optimizer) pair twice. E.g.::

    python -m funcopt.bench --suite full --device cuda --problems cifar-cnn-large \\
        --optimizers adamw,soap --out piece1
    python -m funcopt.bench --suite full --device cuda --problems cifar-cnn-large \\
        --optimizers psgd --out piece2
    python -m funcopt.bench --merge piece1 piece2 --out bench-report

Cut off: every finished run (one problem, optimizer, seed and learning rate) is saved in
``--out`` as ``runs.json`` as soon as it finishes, so a command stopped before its report (a
time limit, a lost machine, Ctrl-C) leaves that file behind (an earlier report in ``--out``
stays beside it); the report, when written, replaces the folder, ``runs.json`` with it. The
same command with ``--resume`` takes the saved runs instead of running them again: the sweeps
choose as before, only the missing runs run, and the report is the one an uninterrupted
command writes, except that its header lists the runs taken and the commands, devices and
dates that made them (their timings were measured there). Saved runs that failed (a CUDA
out-of-memory error, say) are not taken but run again, their new results replacing them; those
that finished or did not apply ("skipped") are taken. ``--resume`` is refused, naming the
setting, when the saved runs were made under other settings or code: those ``--merge``
compares, ``--steps``, problems and optimizers, funcopt's source, and the file of each problem
and optimizer (an edited plugin). With no saved runs in ``--out`` it runs everything, so one
command line serves the first try and every retry; without it, a folder holding saved runs is
refused (``--force`` deletes them and starts over); so is a second command into an ``--out``
that a running one saves its runs in. A piece longer than one time limit::

    python -m funcopt.bench --suite full --device cuda --problems char-transformer-large \\
        --optimizers soap --out piece3 --resume    # again, until it writes piece3/report.md

Every option (names, numbers, device, plugins, the report folder) is checked before anything
runs; a bad one exits with status 1 and one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.util
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from funcopt.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS
from funcopt.bench.problems import DEFAULT_PROBLEMS, FULL_PROBLEMS, PROBLEMS, missing_packages
from funcopt.bench.run import WARMUP_STEPS, device_name
from funcopt.bench.suite import EVALS, EXTEND, GRIDS, SEEDS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m funcopt.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", help="comma-separated problem names (default: the default suite)")
    p.add_argument("--optimizers", help="comma-separated optimizer names (default: all)")
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick (default): small problems, 1 seed, 3 learning rates; full: "
                        "larger problems, 3 seeds, 5 learning rates (each plus up to 2 beyond "
                        "an end of the grid that wins)")
    p.add_argument("--steps", type=int, help="steps per run (default: each problem's own)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--seeds", type=int,
                   help="seeds per (problem, optimizer): --seed, --seed + 1, ... (default: 1 in "
                        "the quick suite, 3 in the full one)")
    p.add_argument("--tune", choices=("on", "off"), default="on",
                   help="on (default): sweep each optimizer's learning rate on a log grid and "
                        "keep the best on the validation split; off: each one's default")
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                   help=f"untimed steps on a copy before the timed run (default {WARMUP_STEPS})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="bench-report",
                   help="report folder: a new or empty folder, or an earlier report, which is "
                        "replaced when the new one is complete (default: bench-report)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a folder of other files (they are deleted)")
    p.add_argument("--plugin", action="append", default=[],
                   help="a module name or a path to a .py file to import first (it registers "
                        "problems/optimizers); repeatable")
    p.add_argument("--list", action="store_true", help="list problems and optimizers and exit")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: small problems run fastest and "
                        "results do not depend on the machine's core count)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="take the runs that an earlier, cut-off run of this command saved in "
                        "--out (runs.json) instead of running them again (those that failed run "
                        "again); with none saved, run everything (see above)")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="run nothing: write into --out the one report of these earlier report "
                        "folders (pieces of one suite; see above)")
    return p


# options that choose what runs: a merge runs nothing, so it takes none of them
_RUN_OPTIONS = ("problems", "optimizers", "suite", "steps", "seed", "seeds", "tune", "warmup",
                "device", "plugin", "list", "threads", "resume")


def _fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


def _choose(arg: str | None, known: dict, default: list[str], what: str) -> list[str]:
    if arg is None:
        return list(default)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    if not names:
        raise _fail(f"--{what}s {arg!r} names no {what}; give comma-separated names (see --list)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _fail(f"--{what}s names {', '.join(map(repr, twice))} more than once")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _fail(f"unknown {what} {', '.join(map(repr, unknown))}; "
                    f"known {what}s: {', '.join(sorted(known))} (see --list)")
    return names


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise _fail(f"--device {name!r} is not a device name ({e}); use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _fail(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _fail(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise _fail(f"--device {name}: only cpu and cuda are supported")
    return dev


def _check_numbers(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise _fail("--steps must be at least 1")
    if args.threads < 1:
        raise _fail("--threads must be at least 1")
    cores = os.cpu_count() or 1
    if args.threads > cores:
        raise _fail(f"--threads {args.threads} is more than this machine's {cores} CPU cores")
    if args.seeds is not None and not 1 <= args.seeds <= 100:
        raise _fail("--seeds must be between 1 and 100")
    if args.warmup < 0:
        raise _fail("--warmup must be 0 or more")
    n = args.seeds or 1
    if not 0 <= args.seed <= 2**63 - n:
        raise _fail(f"--seed must be between 0 and 2**63 - {n} (seeds run from --seed up)")


def _load_plugin(spec: str) -> None:
    """Import ``spec``: a module on the Python path, or a ``.py`` file given by its path."""
    as_file = spec.endswith(".py") or "/" in spec or "\\" in spec
    try:
        if as_file:
            _import_file(spec)
        elif spec not in sys.modules and (not spec.strip() or importlib.util.find_spec(spec) is None):
            hint = f" (for a file here, pass its path: --plugin ./{spec}.py)" \
                if Path(f"{spec}.py").is_file() else ""
            raise _fail(f"--plugin {spec!r}: no module of that name on the Python path{hint}")
        else:
            importlib.import_module(spec)
    except SystemExit:
        raise
    except Exception as e:  # the plugin's own error: its import failed, a name is taken, ...
        raise _fail(f"--plugin {spec!r} failed while importing: {type(e).__name__}: {e}") from None


def _import_file(spec: str) -> None:
    path = Path(spec)
    if path.is_dir():
        raise _fail(f"--plugin {spec!r} is a folder; give a .py file, or a module name")
    if not path.is_file():
        raise _fail(f"--plugin {spec!r}: no such file")
    if path.suffix != ".py":
        raise _fail(f"--plugin {spec!r}: a plugin file must be a .py file")
    full = path.resolve()
    # one module per file, however often it is named, so its problems register once
    name = f"_funcopt_plugin_{hashlib.sha256(str(full).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return
    module_spec = importlib.util.spec_from_file_location(name, full)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(full.parent))  # as for a script: it may import files beside it
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(full.parent))


def _print_list() -> None:
    def tag(n: str) -> str:
        missing = missing_packages(n)
        return f"{n}{'*' if n in DEFAULT_PROBLEMS else ''}" + \
            (f" (needs {', '.join(missing)}: not installed)" if missing else "")

    print("problems:  ", ", ".join(map(tag, PROBLEMS)))
    print("optimizers:", ", ".join(OPTIMIZERS))
    print("(* = in the quick suite, the default; --suite full runs "
          f"{', '.join(FULL_PROBLEMS)})")


def _check_packages(problems: list[str]) -> None:
    for name in problems:
        missing = missing_packages(name)
        if missing:
            raise _fail(f"problem {name!r} needs {', '.join(missing)}, which is not installed: "
                        f"pip install {' '.join(missing)} (or pip install 'funcopt[bench]')")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.command = shlex.join(["python", "-m", "funcopt.bench", *argv])
    if args.merge is not None:
        return _merge(args)
    _check_numbers(args)
    for spec in dict.fromkeys(args.plugin):
        _load_plugin(spec)
    if args.list:
        _print_list()
        return 0
    suite = FULL_PROBLEMS if args.suite == "full" else DEFAULT_PROBLEMS
    problems = _choose(args.problems, PROBLEMS, suite, "problem")
    optimizers = _choose(args.optimizers, OPTIMIZERS, DEFAULT_OPTIMIZERS, "optimizer")
    _check_packages(problems)
    device = _device(args.device)

    from funcopt.bench.report import plotting_unavailable, prepare_out

    no_plots = plotting_unavailable()
    if no_plots:
        print(f"note: {no_plots}; the report will have no plots "
              "(pip install 'funcopt[bench]' installs matplotlib)", file=sys.stderr)
    try:
        partial = prepare_out(Path(args.out), force=args.force, resume=args.resume)
    except ValueError as e:
        raise _fail(f"--out {e}") from None
    saved = None
    try:
        settings = _settings(args, problems, optimizers, device)
        saved = _saved(args, settings)
        return _run(args, settings, saved, device, partial, no_plots)
    except KeyboardInterrupt:
        kept = "" if not saved or not saved.written else (
            f"; {saved.written} finished runs are saved in {saved.path}: the same command with "
            "--resume takes them and runs the rest")
        print(f"interrupted: no report written{kept}", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if saved is not None:
            saved.close()


def _settings(args, problems: list[str], optimizers: list[str], device: torch.device) -> dict:
    """The report's meta before the runs: what decides their results, and the command."""
    tune = args.tune == "on"
    return {"suite": args.suite, "seed": args.seed,
            "seeds": [args.seed + i for i in range(args.seeds or SEEDS[args.suite])],
            "tune": tune, "grid": list(GRIDS[args.suite]) if tune else [], "warmup": args.warmup,
            "extend": EXTEND if tune else 0, "evals": EVALS[args.suite],
            "device": str(device), "device_name": device_name(device),
            "steps": args.steps, "threads": args.threads, "command": args.command,
            "problems": problems, "optimizers": optimizers}


def _saved(args, settings: dict):
    """The runs this command saves in --out as they finish, with those an earlier, cut-off run
    of it saved there when --resume (refused, one line, when made under other settings)."""
    from funcopt.bench.resume import InUse, SavedRuns

    try:
        saved = SavedRuns(Path(args.out), settings, resume=args.resume)
    except InUse as e:
        raise _fail(f"--out {e}") from None
    except ValueError as e:
        raise _fail(f"--resume: {e}") from None
    if args.resume and saved.earlier:
        failed = saved.failed()
        again = "" if not failed else f", but for the {failed} that failed, which run again"
        print(f"resuming: the {len(saved.earlier)} runs saved in {saved.path} are taken, not run "
              f"again{again}", file=sys.stderr)
    elif args.resume:
        print(f"note: --resume: {args.out} holds no saved runs ({saved.path.name}), so every "
              "run runs", file=sys.stderr)
    return saved


def _run(args, settings: dict, saved, device, partial: Path, no_plots: str | None) -> int:
    from funcopt.bench.suite import run_suite

    torch.set_num_threads(args.threads)
    problems, optimizers, seeds = settings["problems"], settings["optimizers"], settings["seeds"]
    sweep = len(GRIDS[args.suite]) + EXTEND if args.tune == "on" else 1
    bar = _progress(args, len(problems) * len(optimizers) * (sweep + len(seeds) - 1))
    t0 = time.perf_counter()
    results, sweeps = run_suite(problems, optimizers, seeds=seeds, tune=args.tune == "on",
                                grid=GRIDS[args.suite], device=device, steps=args.steps,
                                warmup=args.warmup, evals=EVALS[args.suite], progress=bar,
                                saved=saved)
    resumed = saved.resumed()
    meta = {**settings,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            # a resumed report's runs took their own seconds in the commands that made them
            "total_s": time.perf_counter() - t0 + sum(r["total_s"] for r in resumed),
            "no_plots": no_plots, **({"resumed": resumed} if resumed else {})}
    bar.close()
    return _write(args, results, sweeps, meta, partial, t0)


def _write(args, results, sweeps, meta: dict, partial: Path, t0: float) -> int:
    """Print the table, write the report into --out; exit status 1 if a run failed."""
    from funcopt.bench.report import markdown_table, write_report

    print(markdown_table(results))
    try:
        write_report(results, Path(args.out), meta, partial=partial, force=args.force,
                     plots=meta["no_plots"] is None, sweeps=sweeps)
    except ValueError as e:  # --out changed while the runs went on
        raise _fail(f"--out {e}; the report was not written") from None
    except OSError as e:  # a full disk, a folder removed under us
        raise _fail(f"--out {args.out}: writing the report failed ({e}); nothing was "
                    "replaced") from None
    print(f"\nreport: {args.out}/report.md ({time.perf_counter() - t0:.0f} s)")
    return 1 if any(r.status == "failed" for r in results) else 0


def _merge(args) -> int:
    """``--merge``: one report from earlier report folders (:func:`merge_reports`)."""
    from funcopt.bench.load import merge_reports
    from funcopt.bench.report import check_out, plotting_unavailable, prepare_out

    t0 = time.perf_counter()
    defaults = _parser().parse_args([])
    given = [o for o in _RUN_OPTIONS if getattr(args, o) != getattr(defaults, o)]
    if given:
        raise _fail(f"--merge runs nothing, so --{given[0]} does not apply; give only --merge, "
                    "--out and --force")
    out = Path(args.out).resolve()
    if any(out == Path(d).resolve() or out in Path(d).resolve().parents for d in args.merge):
        raise _fail(f"--out {args.out} is one of the --merge folders or holds one, and the "
                    "report replaces --out whole; name a new folder")
    try:
        check_out(Path(args.out), force=args.force)
    except ValueError as e:
        raise _fail(f"--out {e}") from None
    try:
        meta, results, sweeps = merge_reports([Path(d) for d in args.merge])
    except ValueError as e:
        raise _fail(f"--merge {e}") from None
    no_plots = plotting_unavailable()
    if no_plots:
        print(f"note: {no_plots}; the report will have no plots", file=sys.stderr)
    meta.update(command=args.command, no_plots=no_plots,
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    try:
        partial = prepare_out(Path(args.out), force=args.force)
    except ValueError as e:
        raise _fail(f"--out {e}") from None
    try:
        return _write(args, results, sweeps, meta, partial, t0)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class _progress:
    """A progress bar over at most ``total`` runs (tqdm when installed and not --no-progress);
    called with each run's label."""

    def __init__(self, args, total: int):
        self.bar = None
        if not args.no_progress:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="run")
            except ImportError:
                pass

    def __call__(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
