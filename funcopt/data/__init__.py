"""Data for tests and benchmarks, outside the optimizer core: :mod:`funcopt.data.nist` (the NIST
StRD nonlinear-regression problems, also reachable as ``funcopt.nist``)."""
