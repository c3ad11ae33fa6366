"""``--resume``: a benchmark command saves every finished run in its report folder as the run
finishes, so that a command cut off before its report (a time limit, a lost machine, Ctrl-C)
keeps them; the same command with ``--resume`` takes them back instead of running them again,
but for those that failed, which it runs again.

The saved-runs file ``OUT/runs.json`` (:data:`funcopt.bench.load.RUNS`) holds the command's
settings, the commands (processes) that made runs, with their device, machine and start date,
and one entry per run (one problem, optimizer, seed and learning rate): the rate asked for
(None: the optimizer's default), which command made it, when it finished, its seconds, and its
:class:`~funcopt.bench.run.Result` as results.json holds it. After every run the file is
written whole beside the old one and renamed over it, so a kill at any moment leaves the old
file or the new one, never a part of one.

A saved run is taken back when the resumed command asks for the same problem, optimizer, seed
and learning rate, and it finished ("ok") or did not apply ("skipped"). A saved run that failed
("failed": often a passing cause, such as a CUDA out-of-memory error beside another job) runs
again, and its new result replaces it in the file; a failure that is no accident fails again,
as in an uninterrupted command. The suite asks for its runs in an order fixed by the results
before them (the grid's extensions, the chosen rate), so the resumed command asks for the saved
runs again, gets their results, makes the same choices and runs only the missing runs and the
failed ones (where a failed sweep point now finishes, the choices follow its new result): its
report is the one an uninterrupted command writes, but for the header, which names the runs
taken and where and when they ran (their timings were measured there). A saved run counts only under the
settings that made it: those :func:`~funcopt.bench.load.differing` compares for ``--merge``,
the same ``--steps``, problems and optimizers, and the same code (funcopt's source, and the file
defining each problem and optimizer, so an edited plugin is another problem); anything else
refuses ``--resume``. A second command into the same folder is refused while the first runs
(a lock on the folder): the two would rewrite runs.json each with its own runs.
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funcopt.bench.load import (
    META,
    RUNS,
    RUNS_TMP,
    SHARED,
    check_entries,
    check_meta,
    check_result,
    differing,
    fits,
    from_json,
    process_meta,
)
from funcopt.bench.optimizers import LEARNING_RATES, OPTIMIZERS
from funcopt.bench.problems import PROBLEMS
from funcopt.bench.run import Result

__all__ = ["SavedRuns"]

FORMAT = "funcopt.bench saved runs 1"
NOTE = ("The finished runs of a python -m funcopt.bench command that has not written its report "
        "(yet); the same command with --resume takes them instead of running them again, but "
        "for those that failed, which it runs again.")
# besides load.differing's settings, what a resumed command must share with the saved runs
_SAME = ("steps", "problems", "optimizers", "code")
_PROCESS: dict[str, Any] = {"command": str, "date": str, "device": str, "device_name": str,
                            "machine": str | None, "cpu_count": int | None}
_ENTRY: dict[str, Any] = {"lr": float | None, "by": int, "date": str, "s": float,
                          "result": dict[str, Any]}
_START_OVER = "or start over: the command without --resume and with --force (which deletes them)"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def code_digests(problems: list[str], optimizers: list[str]) -> dict[str, str]:
    """What a run's result depends on besides the settings, as digests: funcopt's own source,
    and each problem's and optimizer's definition (its name and file, and a default rate)."""
    root = Path(__file__).resolve().parents[1]  # the funcopt package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes())
    out = {"funcopt": h.hexdigest()[:16]}
    for name in problems:
        out[f"problem {name}"] = _defined(PROBLEMS[name])
    for name in optimizers:
        out[f"optimizer {name}"] = _defined(OPTIMIZERS[name]) + f" lr {LEARNING_RATES.get(name)}"
    return out


def _defined(f: Any) -> str:
    """A function's name and a digest of the file that defines it (the name alone if none).
    A ``functools.partial`` is its function and its bound arguments, a callable object its
    class: named alone ("partial", the class), an edit of either went unseen."""
    bound = ""
    while isinstance(f, functools.partial):
        # repr, without the addresses that differ between processes
        bound += re.sub(r" at 0x[0-9a-fA-F]+", "", f" {f.args!r} {f.keywords!r}")
        f = f.func
    if not (inspect.isroutine(f) or inspect.isclass(f)):
        f = type(f)
    name: str = getattr(f, "__qualname__", type(f).__qualname__)
    try:
        source = Path(inspect.getsourcefile(f) or "")
        return f"{name} {hashlib.sha256(source.read_bytes()).hexdigest()[:16]}{bound}"
    except (TypeError, OSError):  # a builtin, a function typed in at a prompt
        return name + bound


class SavedRuns:
    """The finished runs of one command, saved in ``out/runs.json``; called as
    :func:`~funcopt.bench.suite.run_suite`'s ``saved``, it takes back a run saved by an earlier
    command (``resume``) unless that run failed, or makes the run and saves it.

    settings: the command's meta before its runs (suite, seeds, device, ..., command); this
    process's versions, machine and the code's digests are added. Raises a ValueError saying
    what is wrong and how to go on when the saved runs cannot be resumed."""

    def __init__(self, out: Path, settings: dict, *, resume: bool):
        self.path = Path(out) / RUNS
        self.meta = {**process_meta(), **settings,
                     "code": code_digests(settings["problems"], settings["optimizers"])}
        # the commands that made runs: earlier ones (resumed), then this one
        self.processes = [{**{k: self.meta[k] for k in _PROCESS if k != "date"}, "date": _now()}]
        self.runs: list[dict] = []
        self.written = 0  # how many runs the file holds
        self.earlier: dict[tuple, dict] = {}  # (problem, optimizer, seed, lr) -> saved entry
        self.taken: list[dict] = []
        self.unsaved = False
        self.lock = _hold(self.path.parent)
        try:
            if resume and self.path.exists():
                self._load()
            elif self.path.exists():  # --force without --resume: start over
                self.path.unlink()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let --out go (for the next command), and remove it if this command left it empty
        (it made it to hold the lock)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty (or gone): as it is
                pass

    def __call__(self, problem: str, optimizer: str, seed: int, lr: float | None,
                 run: Callable[[], Result]) -> Result:
        key = (problem, optimizer, seed, lr)
        entry = self.earlier.get(key)
        if entry is not None and entry["result"]["status"] != "failed":
            self.taken.append(entry)
            return Result(**copy.deepcopy(entry["result"]))  # the suite may edit its reason
        t0 = time.perf_counter()
        result = run()
        new = {"lr": lr, "by": len(self.processes) - 1, "date": _now(),
               "s": time.perf_counter() - t0, "result": result.to_json()}
        if entry is None:
            self.runs.append(new)
        else:  # a failed run made again: its new result takes the old one's place
            del self.earlier[key]
            self.runs[next(i for i, e in enumerate(self.runs) if e is entry)] = new
        self._write()
        return result

    def failed(self) -> int:
        """How many of the earlier commands' saved runs failed (and so run again)."""
        return sum(e["result"]["status"] == "failed" for e in self.earlier.values())

    def _write(self) -> None:
        """All runs so far, written whole beside the file and renamed over it. A file that
        cannot be written stops the saving, not the runs (said once)."""
        if self.unsaved:
            return
        tmp = self.path.with_name(RUNS_TMP)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"format": FORMAT, "note": NOTE, "meta": self.meta,
                           "processes": self.processes, "runs": self.runs}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.written = len(self.runs)
        except OSError as e:
            self.unsaved = True
            print(f"warning: the finished runs cannot be saved in {self.path} ({e}); the "
                  "command goes on, but if it is cut off, --resume has no runs to take",
                  file=sys.stderr)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"it has no \"format\": {FORMAT!r}")
            parts: list[Any] = [data.get(k) for k in ("meta", "processes", "runs")]
            meta, processes, runs = parts
            if not (isinstance(meta, dict) and fits(processes, list[dict[str, Any]])
                    and fits(runs, list[dict[str, Any]]) and processes):
                raise ValueError("its meta, processes or runs are missing or of the wrong type")
            hints = {**META, "code": dict[str, str]}
            bad = [k for k in (*SHARED, *_SAME) if k not in meta or not fits(meta[k], hints[k])]
            if bad:
                raise ValueError(f"meta.{bad[0]} is missing or of the wrong type")
            check_meta(meta)
            check_entries(processes, _PROCESS, "processes")
            check_entries(runs, _ENTRY, "runs")
            for i, entry in enumerate(runs):
                where = f"runs[{i}]"
                if "lr" not in entry or not 0 <= entry["by"] < len(processes):
                    raise ValueError(f"{where} has no lr or names no process")
                r = from_json(Result, entry["result"], f"{where}.result")
                check_result(r, f"{where}.result")
                key = (r.problem, r.optimizer, r.seed, entry["lr"])
                if self.earlier.setdefault(key, entry) is not entry:
                    raise ValueError(f"{where} is a second {key}")
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{self.path}: is corrupt or not a file of saved runs ({e}); move it "
                             f"away, {_START_OVER}") from None
        self._check(meta, processes[0]["command"])
        self.runs, self.written = runs, len(runs)
        self.processes = [*processes, *self.processes]

    def _check(self, meta: dict, command: str) -> None:
        """Refuse saved runs made under other settings or code than this command's."""
        key = differing(meta, self.meta) or next((k for k in _SAME if meta[k] != self.meta[k]),
                                                 None)
        if key is None:
            return
        fix = f"resume with the command that made them (`{command}`), {_START_OVER}"
        if key == "code":
            name = next(k for k in sorted({*meta[key], *self.meta[key]})
                        if meta[key].get(k) != self.meta[key].get(k))
            what = "funcopt's source code" if name == "funcopt" else f"the code of {name}"
            raise ValueError(f"{self.path}: {what} has changed since its runs were made, so "
                             f"their results may differ; {fix}")
        raise ValueError(f"{self.path}: its runs were made with {key} {meta[key]!r}, and this "
                         f"command's {key} is {self.meta[key]!r}; {fix}")

    def resumed(self) -> list[dict]:
        """For the report's meta: per earlier command whose runs were taken, where and when it
        ran them, their seconds, and which runs they are in words."""
        out = []
        for i, process in enumerate(self.processes):
            mine = [e for e in self.taken if e["by"] == i]
            if mine:
                out.append({**process, "until": mine[-1]["date"],
                            "total_s": sum(e["s"] for e in mine), "runs": len(mine),
                            "which": _which([e["result"] for e in mine])})
        return out


class InUse(ValueError):
    """--out is held by another command that saves its runs there."""


def _hold(out: Path) -> int | None:
    """An exclusive lock on the folder ``out`` (made if new), held while the descriptor it
    returns is open: two commands saving runs into one folder each rewrite runs.json with
    their own runs, so a pair cut off loses one's, and a --force one deletes the other's.
    None where the system has no ``flock`` (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InUse(f"{out}: another command is running into it (saving its runs there); let "
                    "it finish, or give this one another --out") from None
    return fd


def _which(results: list[dict]) -> str:
    """Runs in words: "adamw on digits-logreg: seed 0 at lr 0.01, 0.0316; seed 1 at lr 0.0316"."""
    groups: dict[tuple[str, str], dict[int, list[str]]] = {}
    for r in results:
        lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
        groups.setdefault((r["optimizer"], r["problem"]), {}).setdefault(r["seed"], []).append(lr)
    return " · ".join(f"{opt} on {prob}: " + "; ".join(
        f"seed {seed} at lr {', '.join(lrs)}" for seed, lrs in seeds.items())
        for (opt, prob), seeds in groups.items())
