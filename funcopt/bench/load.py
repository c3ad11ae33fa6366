"""Read back what earlier commands wrote, for ``--merge`` and ``--resume``: a report folder's
``results.json`` (:func:`load_report`), checked field by field, and several of them merged into
one report (:func:`merge_reports`); the checks that saved runs (:mod:`funcopt.bench.resume`)
share with it (:func:`fits`, :func:`from_json`, :func:`check_meta`, :func:`check_result`,
:func:`differing`); and this process's versions and machine (:func:`process_meta`), which a
report's meta and the saved runs record. Writing the report is :mod:`funcopt.bench.report`."""

from __future__ import annotations

import json
import os
import platform
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from funcopt.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS
from funcopt.bench.problems import DEFAULT_PROBLEMS, FULL_PROBLEMS, PROBLEMS
from funcopt.bench.run import Result
from funcopt.bench.suite import Sweep

__all__ = ["META", "RUNS", "RUNS_TMP", "SHARED", "check_entries", "check_meta", "check_result",
           "differing", "fits", "from_json", "load_report", "merge_reports", "process_meta"]

# A command saves each finished run in --out as RUNS (written whole to RUNS_TMP, then renamed
# over it), so that one cut off before its report can be continued (--resume); the report
# replaces the folder, RUNS with it, when complete.
RUNS = "runs.json"
RUNS_TMP = RUNS + ".tmp"


def process_meta() -> dict:
    """This process's torch and Python versions and machine, as a report's meta gives them."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


# what a report's meta must hold to be merged, and its type; the first group every piece shares
SHARED: dict[str, Any] = {"device": str, "device_name": str, "torch": str, "python": str,
                          "suite": str, "seeds": list[int], "tune": bool, "grid": list[float],
                          "extend": int, "evals": int, "warmup": int, "threads": int}
# steps: --steps, or per problem in a merged report (which can be merged again)
META: dict[str, Any] = {**SHARED, "steps": int | None | dict[str, int | None],
                        "problems": list[str], "optimizers": list[str], "date": str,
                        "total_s": float, "pieces": list[dict[str, Any]],
                        "resumed": list[dict[str, Any]]}
_OPTIONAL = ("pieces", "resumed")  # only a merged report has pieces, a resumed one resumed
_PIECE: dict[str, Any] = {"folder": str, "command": str, "device": str, "device_name": str,
                          "date": str, "total_s": float, "resumed": list[dict[str, Any]] | None}
# a command cut off whose runs a report took (--resume), and which runs (in words)
_RESUMED: dict[str, Any] = {"command": str, "device": str, "device_name": str,
                            "machine": str | None, "cpu_count": int | None, "date": str,
                            "until": str, "total_s": float, "runs": int, "which": str}


# fields added after reports were first written: an older report without them loads with the
# field's default (a sweep from before the grid extension went beyond no end)
_LATER = {(Sweep, "beyond")}


def fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON has the type ``hint`` (a class, ``X | None``,
    ``list[X]``, ``dict[str, X]`` or ``Any``); a float may be written as an int."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(fits(v, args[1]) for v in value.values())
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def from_json(cls, data: Any, where: str):
    """``cls(**data)`` for a dataclass, after checking every field is there with its type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not an object")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in data and (cls, f.name) in _LATER:  # a report from before the field
            continue
        if f.name not in data:
            raise ValueError(f"{where} has no field {f.name!r}")
        if not fits(data[f.name], hints[f.name]):
            raise ValueError(f"{where}.{f.name} is {data[f.name]!r}, not a {hints[f.name]}")
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def load_report(folder: Path) -> tuple[dict, list[Result], list[Sweep]]:
    """The meta, per-seed results and sweeps in a report folder's ``results.json``.

    Raises a ValueError naming the folder when it is not a complete report (no
    ``results.json``: a run that stopped writes none) or the file is corrupt: not JSON, a
    field missing or of the wrong type, a result whose problem or optimizer the run did not
    list, a finished run with no final loss.
    """
    folder = Path(folder)
    path = folder / "results.json"
    if not folder.is_dir():
        raise ValueError(f"{folder}: {'is not a folder' if folder.exists() else 'no such folder'}")
    if (folder / RUNS).is_file() and not path.is_file():
        raise ValueError(f"{folder}: is not a complete report but the saved runs of a command "
                         f"that was cut off ({RUNS}); continue it by running that command again "
                         "with --resume")
    if not path.is_file():
        raise ValueError(f"{folder}: is not a complete report: it has no results.json (a run "
                         "that stopped early writes none); run that piece again")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        meta = data.get("meta")
        if not isinstance(meta, dict):
            raise ValueError("it has no meta object")
        if "extend" not in meta:  # written before meta recorded the grid's extension: 2 (its
            # only setting then) where the sweeps carry the extension's field, else 0 (none)
            sweeps = data.get("sweeps")
            meta["extend"] = 2 if meta.get("tune") and isinstance(sweeps, list) and any(
                isinstance(s, dict) and "beyond" in s for s in sweeps) else 0
        for key, hint in META.items():
            if key in _OPTIONAL and key not in meta:
                continue
            if key not in meta:
                raise ValueError(f"it has no meta.{key} (written by an older funcopt.bench?)")
            if not fits(meta[key], hint):
                raise ValueError(f"meta.{key} is {meta[key]!r}, not a {hint}")
        check_entries(meta.get("pieces", []), _PIECE, "meta.pieces")
        check_entries(meta.get("resumed", []), _RESUMED, "meta.resumed")
        for i, piece in enumerate(meta.get("pieces", [])):
            check_entries(piece.get("resumed") or [], _RESUMED, f"meta.pieces[{i}].resumed")
        results = [from_json(Result, r, f"results[{i}]")
                   for i, r in enumerate(_list(data, "results"))]
        sweeps = [from_json(Sweep, s, f"sweeps[{i}]") for i, s in enumerate(_list(data, "sweeps"))]
        _check_rows(meta, results, sweeps)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{folder}: results.json is corrupt ({e}); run that piece again") from None
    return meta, results, sweeps


def check_entries(entries: list[dict], spec: dict[str, Any], where: str) -> None:
    for i, entry in enumerate(entries):
        bad = [k for k, hint in spec.items() if not fits(entry.get(k), hint)]
        if bad:
            raise ValueError(f"{where}[{i}].{bad[0]} is missing or of the wrong type")


def _list(data: dict, key: str) -> list:
    if not isinstance(data.get(key), list):
        raise ValueError(f"it has no {key} list")
    return data[key]


def check_meta(meta: dict) -> None:
    """A ValueError when a meta (its fields' types checked) cannot be a run's: no seeds,
    problems or optimizers, a device that is none, per-problem steps of other problems."""
    empty = [k for k in ("seeds", "problems", "optimizers") if not meta[k]]
    if empty:
        raise ValueError(f"meta.{empty[0]} is empty")
    try:
        torch.device(meta["device"])
    except RuntimeError:
        raise ValueError(f"meta.device {meta['device']!r} is not a device name") from None
    if isinstance(meta["steps"], dict) and set(meta["steps"]) != set(meta["problems"]):
        raise ValueError(f"meta.steps names {sorted(meta['steps'])}, not meta.problems")


def _check_rows(meta: dict, results: list[Result], sweeps: list[Sweep]) -> None:
    check_meta(meta)
    rows: list[tuple[str, Result | Sweep]] = [
        *((f"results[{i}]", r) for i, r in enumerate(results)),
        *((f"sweeps[{i}]", s) for i, s in enumerate(sweeps))]
    for what, row in rows:
        if row.problem not in meta["problems"] or row.optimizer not in meta["optimizers"]:
            raise ValueError(f"{what} is {row.optimizer} on {row.problem}, which "
                             "meta.problems x meta.optimizers does not hold")
    seen: dict[tuple[str, str, int], int] = {}
    for i, r in enumerate(results):
        check_result(r, f"results[{i}]")
        j = seen.setdefault((r.problem, r.optimizer, r.seed), i)
        if j != i:
            raise ValueError(f"results[{i}] and results[{j}] are both {r.optimizer} on "
                             f"{r.problem} with seed {r.seed}")


def check_result(r: Result, where: str) -> None:
    """A ValueError naming ``where`` if ``r`` (read from a file) is not a result a run makes:
    a status of its three, a finished run without its losses, curves that do not match."""
    if r.status not in ("ok", "skipped", "failed"):
        raise ValueError(f"{where}.status is {r.status!r}")
    if r.status == "ok" and ("loss" not in r.final or "loss" not in r.final_val):
        raise ValueError(f"{where} finished but has no final or validation loss")
    _check_curves(r, where)


def _check_curves(r: Result, where: str) -> None:
    """A result's curves are one entry per evaluation (step, time, validation loss), and a
    target reached has both its step and its time, the step one of the evaluations'."""
    lengths = {len(r.curve_step), len(r.curve_time), len(r.curve_eval)}
    if len(lengths) != 1:
        raise ValueError(f"{where}: curve_step, curve_time and curve_eval have lengths "
                         f"{len(r.curve_step)}, {len(r.curve_time)} and {len(r.curve_eval)}, "
                         "not one entry per evaluation each")
    if (r.steps_to_target is None) != (r.time_to_target_s is None) or (
            r.steps_to_target is not None and r.steps_to_target not in r.curve_step):
        raise ValueError(f"{where}: steps_to_target {r.steps_to_target!r} and time_to_target_s "
                         f"{r.time_to_target_s!r} are not an evaluation's step and time")


def merge_reports(folders: list[Path]) -> tuple[dict, list[Result], list[Sweep]]:
    """The meta, results and sweeps of one report over the report folders ``folders``.

    Refused (a ValueError naming the folder and the field): a folder named twice, pieces that
    differ in any of device type and name, torch and Python versions, suite, seeds, tuning
    (grid), evaluations, warm-up and torch threads (the report states each once), a problem run
    with a different ``--steps`` in two pieces, and a (problem, optimizer) pair in two pieces.
    Rows come in the order a single run of the suite gives (problems and optimizers in
    ``--list`` order), each pair's seeds in its piece's order; ``meta`` gets ``pieces``, one
    entry per folder (its command, device, machine, date and seconds) for the header.
    """
    folders = [Path(f) for f in folders]
    for i, f in enumerate(folders):
        if f.resolve() in [g.resolve() for g in folders[:i]]:
            raise ValueError(f"{f}: is named twice")
    pieces = [(f, *load_report(f)) for f in folders]
    first, meta0 = pieces[0][0], pieces[0][1]
    owner: dict[tuple[str, str], Path] = {}
    steps: dict[str, tuple[Path, int | None]] = {}
    for folder, meta, results, _ in pieces:
        key = differing(meta, meta0)
        if key is not None:
            raise ValueError(f"{folder}: its {key} {meta[key]!r} differs from {first}'s "
                             f"{meta0[key]!r}; runs under different {key}s cannot share "
                             "one report")
        for prob, mine in _steps_of(meta).items():
            earlier = steps.setdefault(prob, (folder, mine))
            if earlier[1] != mine:
                raise ValueError(f"{folder}: its steps {mine!r} differ from "
                                 f"{earlier[0]}'s {earlier[1]!r} for {prob}; a problem's runs "
                                 "must all have the same --steps")
        for pair in dict.fromkeys((r.problem, r.optimizer) for r in results):
            if owner.setdefault(pair, folder) != folder:
                raise ValueError(f"{folder}: {pair[1]} on {pair[0]} is also in {owner[pair]}; "
                                 "each (problem, optimizer) pair must come from one piece")
    return _merged(pieces)


def differing(meta: dict, other: dict) -> str | None:
    """The first setting that two runs' meta must share to be in one report (device type and
    name, torch and Python versions, suite, seeds, tuning and grid, evaluations, warm-up,
    threads) in which they differ; None when they differ in none."""
    for key in SHARED:
        mine, theirs = meta[key], other[key]
        if key == "device":  # cuda:0 and cuda:1 of one model (device_name) are alike
            mine, theirs = torch.device(mine).type, torch.device(theirs).type
        if mine != theirs:
            return key
    return None


def _steps_of(meta: dict) -> dict[str, int | None]:
    """Each problem's --steps (None: the problem's own count)."""
    steps = meta["steps"]
    return dict(steps) if isinstance(steps, dict) else {p: steps for p in meta["problems"]}


def _order(names: list[str], known: list[str]) -> list[str]:
    """``names`` once each, in their order in ``known``; unknown ones after, as first seen."""
    seen = list(dict.fromkeys(names))
    rank = {n: i for i, n in reversed(list(enumerate(known)))}
    return sorted(seen, key=lambda n: (rank.get(n, len(known)), seen.index(n)))


def _merged(pieces: list) -> tuple[dict, list[Result], list[Sweep]]:
    metas = [m for _, m, _, _ in pieces]
    suite = FULL_PROBLEMS if metas[0]["suite"] == "full" else DEFAULT_PROBLEMS
    problems = _order([p for m in metas for p in m["problems"]], [*suite, *PROBLEMS])
    optimizers = _order([o for m in metas for o in m["optimizers"]],
                        [*DEFAULT_OPTIMIZERS, *OPTIMIZERS])

    def rank(r: Result | Sweep) -> tuple[int, int]:
        return problems.index(r.problem), optimizers.index(r.optimizer)

    results = sorted((r for _, _, rs, _ in pieces for r in rs), key=rank)  # stable: seed order
    sweeps = sorted((s for _, _, _, ss in pieces for s in ss), key=rank)
    given = {p: n for m in metas for p, n in _steps_of(m).items()}  # equal where shared
    steps = {p: given[p] for p in problems}

    def common(key: str) -> Any:
        return metas[0].get(key) if all(m.get(key) == metas[0].get(key) for m in metas) else None

    meta = {**{k: metas[0][k] for k in SHARED}, "seed": metas[0]["seeds"][0],
            "problems": problems, "optimizers": optimizers,
            "steps": next(iter(steps.values())) if len(set(steps.values())) == 1 else steps,
            "total_s": sum(m["total_s"] for m in metas),
            "machine": common("machine"), "cpu_count": common("cpu_count"),
            "pieces": [piece for f, m, _, _ in pieces for piece in m.get("pieces") or [
                {"folder": str(f), "command": m.get("command") or "(not recorded)",
                 "device": m["device"], "device_name": m["device_name"],
                 "machine": m.get("machine"), "cpu_count": m.get("cpu_count"),
                 "date": m["date"], "total_s": m["total_s"], "problems": m["problems"],
                 "optimizers": m["optimizers"],
                 **({"resumed": m["resumed"]} if m.get("resumed") else {})}]]}
    return meta, results, sweeps
