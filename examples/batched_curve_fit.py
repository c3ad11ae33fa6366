"""2,000 independent curve fits in one call: ``fo.least_squares(..., batched=True)``.

    python examples/batched_curve_fit.py

Each row of ``params`` is one problem; the residual function returns one row of residuals per
problem. Every fit has its own damping, stopping test and result flag.
"""

import torch

import funcopt as fo


def main() -> None:
    g = torch.Generator().manual_seed(0)
    B, t = 2000, torch.linspace(0.0, 3.0, 30, dtype=torch.float64)
    true = torch.stack([torch.rand(B, generator=g, dtype=torch.float64) * 2 + 1,
                        torch.rand(B, generator=g, dtype=torch.float64) * 2.5 + 0.5], 1)
    y = true[:, :1] * torch.exp(-true[:, 1:] * t) + 0.01 * torch.randn(B, 30, generator=g,
                                                                       dtype=torch.float64)
    params = torch.tensor([1.0, 1.0], dtype=torch.float64).repeat(B, 1)
    fit, info = fo.least_squares(lambda p: p[:, :1] * torch.exp(-p[:, 1:] * t) - y, params,
                                 batched=True)
    print(f"{int(info.success.sum())}/{B} fits converged in at most {int(info.steps.max())} "
          f"steps; max |fit - true| = {float((fit - true).abs().max()):.3g}")


if __name__ == "__main__":
    main()
