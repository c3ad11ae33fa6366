"""NIST StRD nonlinear regression problems: a reader for the ``.dat`` files and the models.

The Statistical Reference Datasets (https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml)
give, per problem, data, two starting points and certified parameters and residual sum of
squares to 11 significant digits. The files shipped in ``funcopt/bench/data`` are read with
:func:`load`; :func:`residual_fn` gives ``b -> r`` for :func:`funcopt.least_squares`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "DATA_DIR", "LOWER", "AVERAGE", "HIGHER", "NistProblem", "MODELS",
    "available", "load", "residual_fn", "significant_digits",
]

Tensor = torch.Tensor
DATA_DIR = Path(__file__).parents[1] / "bench" / "data"
LOWER = ("Misra1a", "Chwirut2", "Chwirut1", "Lanczos3", "Gauss1", "Gauss2", "DanWood", "Misra1b")
AVERAGE = ("Kirby2", "Hahn1", "Nelson", "MGH17", "Lanczos1", "Lanczos2", "Gauss3", "Misra1c",
           "Misra1d", "Roszman1", "ENSO")
HIGHER = ("MGH09", "Thurber", "BoxBOD", "Rat42", "MGH10", "Eckerle4", "Rat43", "Bennett5")


def _exp3(b, x):
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _gauss(b, x):
    return (b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
            + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2))


def _cubic_cubic(b, x):
    return (b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3) / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3)


def _misra1a(b, x):
    return b[0] * (1 - torch.exp(-b[1] * x))


def _chwirut(b, x):
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _enso(b, x):
    w = 2 * math.pi * x
    return (b[0] + b[1] * torch.cos(w / 12) + b[2] * torch.sin(w / 12)
            + b[4] * torch.cos(w / b[3]) + b[5] * torch.sin(w / b[3])
            + b[7] * torch.cos(w / b[6]) + b[8] * torch.sin(w / b[6]))


#: name -> model ``f(b, x)`` (``x`` is (N,), or (N, 2) for Nelson whose response is log(y)).
MODELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Misra1a": _misra1a,
    "Chwirut1": _chwirut,
    "Chwirut2": _chwirut,
    "Lanczos1": _exp3,
    "Lanczos2": _exp3,
    "Lanczos3": _exp3,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "Gauss3": _gauss,
    "DanWood": lambda b, x: b[0] * x ** b[1],
    "Misra1b": lambda b, x: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
    "Kirby2": lambda b, x: (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2),
    "Hahn1": _cubic_cubic,
    "Nelson": lambda b, x: b[0] - b[1] * x[:, 0] * torch.exp(-b[2] * x[:, 1]),
    "MGH17": lambda b, x: b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4]),
    "Misra1c": lambda b, x: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
    "Misra1d": lambda b, x: b[0] * b[1] * x * (1 + b[1] * x) ** (-1),
    "Roszman1": lambda b, x: b[0] - b[1] * x - torch.arctan(b[2] / (x - b[3])) / math.pi,
    "ENSO": _enso,
    "MGH09": lambda b, x: b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3]),
    "Thurber": _cubic_cubic,
    "BoxBOD": _misra1a,
    "Rat42": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
    "MGH10": lambda b, x: b[0] * torch.exp(b[1] / (x + b[2])),
    "Eckerle4": lambda b, x: (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
    "Rat43": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3]),
    "Bennett5": lambda b, x: b[0] * (b[1] + x) ** (-1 / b[2]),
}


class NistProblem(NamedTuple):
    """One problem: ``y ~ model(b, x)``; ``starts`` is (2, p), the rest as certified by NIST."""

    name: str
    difficulty: str
    x: Tensor
    y: Tensor
    starts: Tensor
    certified: Tensor
    certified_sd: Tensor
    certified_rss: float
    model: Callable[[Tensor, Tensor], Tensor]


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PARAM = re.compile(rf"^\s*b(\d+)\s*=\s*({_NUM})\s+({_NUM})\s+({_NUM})\s+({_NUM})\s*$")


def available() -> list[str]:
    """Names of the problems whose ``.dat`` file is shipped (and whose model is known)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.dat") if p.stem in MODELS)


def load(name: str | Path, dtype: torch.dtype = torch.float64) -> NistProblem:
    """Read a NIST StRD nonlinear-regression ``.dat`` file (a shipped name or a path)."""
    path = Path(name) if str(name).endswith(".dat") else DATA_DIR / f"{name}.dat"
    if not path.exists():
        raise FileNotFoundError(f"no NIST file {path}; shipped problems: {available()}")
    lines = path.read_text().splitlines()
    stem = path.stem
    if stem not in MODELS:
        raise ValueError(f"no model known for {stem!r}; known: {sorted(MODELS)}")
    params, rss, data_at = [], None, None
    for i, line in enumerate(lines):
        m = _PARAM.match(line)
        if m:
            params.append([float(v) for v in m.groups()[1:]])
        elif line.strip().startswith("Residual Sum of Squares:"):
            rss = float(line.split(":")[1])
        elif re.match(r"^\s*Data:\s+y\b", line):
            data_at = i
    if not params or rss is None or data_at is None:
        raise ValueError(f"{path} is not a NIST StRD nonlinear regression file")
    rows = [[float(v) for v in ln.split()] for ln in lines[data_at + 1:] if ln.strip()]
    table = torch.tensor(rows, dtype=dtype)
    x = table[:, 1] if table.shape[1] == 2 else table[:, 1:]
    p = torch.tensor(params, dtype=dtype)
    difficulty = "lower" if stem in LOWER else "average" if stem in AVERAGE else "higher"
    return NistProblem(stem, difficulty, x, table[:, 0], p[:, :2].T.contiguous(), p[:, 2],
                       p[:, 3], rss, MODELS[stem])


def residual_fn(problem: NistProblem) -> Callable[[Tensor], Tensor]:
    """``b -> model(b, x) - y`` (``- log(y)`` for Nelson), a 1-D residual vector."""
    y = torch.log(problem.y) if problem.name == "Nelson" else problem.y
    x, model = problem.x, problem.model

    def fn(b: Tensor) -> Tensor:
        return model(b, x.to(b.dtype)) - y.to(b.dtype)

    return fn


def significant_digits(value: Tensor | float, certified: Tensor | float) -> Tensor:
    """NIST's log relative error ``-log10(|value - certified| / |certified|)``, capped at 15."""
    v = torch.as_tensor(value, dtype=torch.float64)
    c = torch.as_tensor(certified, dtype=torch.float64)
    rel = (v - c).abs() / c.abs()
    return torch.clamp(-torch.log10(rel), max=15.0).nan_to_num(nan=0.0, posinf=15.0)
