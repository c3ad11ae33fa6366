"""Fit a NIST StRD problem (Misra1a) with funcopt.least_squares and compare with scipy (MINPACK)."""

import torch

import funcopt as fo
from funcopt import nist

problem = nist.load("Misra1a")
fn = nist.residual_fn(problem)
b, info = fo.least_squares(fn, problem.starts[0].clone())
print(f"funcopt: b = {b.tolist()}  RSS = {2 * info.cost:.10e}  steps = {info.steps}  ({info.reason})")
print(f"NIST:    b = {problem.certified.tolist()}  RSS = {problem.certified_rss:.10e}")
print(f"significant digits: {nist.significant_digits(b, problem.certified).tolist()}")
try:
    from scipy.optimize import least_squares

    ref = least_squares(lambda v: fn(torch.tensor(v)).numpy(), problem.starts[0].numpy(), method="lm")
    print(f"scipy:   b = {ref.x.tolist()}  RSS = {2 * ref.cost:.10e}  evaluations = {ref.nfev}")
except ImportError:
    pass
