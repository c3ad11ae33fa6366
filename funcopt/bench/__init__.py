"""The funcopt benchmark: problems x optimizers, a report folder with a table, plots and JSON.

Run it with ``python -m funcopt.bench`` (or ``funcopt-bench``); register your own problem with
:func:`register` (see :class:`Problem`) and load it with ``--plugin your_module``.
"""

from funcopt.bench import deep  # noqa: F401  (registers char-transformer and cifar-cnn)
from funcopt.bench.optimizers import OPTIMIZERS, Runner, Unavailable, register_optimizer
from funcopt.bench.problems import PROBLEMS, Problem, register
from funcopt.bench.run import Result, run_one

__all__ = ["OPTIMIZERS", "PROBLEMS", "Problem", "Result", "Runner", "Unavailable", "register",
           "register_optimizer", "run_one"]
