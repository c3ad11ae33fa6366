"""Levenberg-Marquardt with the damped solve on cuPyNumeric (Legate).

Run on N GPUs with no code change:  legate --gpus N examples/multi_gpu_lm.py
(on CPUs only: LEGATE_CONFIG="--cpus 1 --gpus 0" python examples/multi_gpu_lm.py; where no
NVIDIA driver is installed, Legate also needs a libcuda.so.1 on LD_LIBRARY_PATH: build the
no-device stand-in with ``gcc -shared -fPIC -o stub/libcuda.so.1 .ci/libcuda_stub.c``).
Jacobians are computed by torch (on the GPU when available); the (J^T J + lambda D) solve is
handed to cuPyNumeric, which partitions it across the GPUs Legate was given.
"""

import torch

import funcopt as fo

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
n_params, n_obs = 512, 4096
A = torch.randn(n_obs, n_params, device=device, dtype=torch.float64) / n_params**0.5
w_true = torch.randn(n_params, device=device, dtype=torch.float64)
y = torch.tanh(A @ w_true)


def residual(w):
    return torch.tanh(A @ w) - y


w, info = fo.least_squares(residual, torch.zeros(n_params, device=device, dtype=torch.float64),
                           solver="cupynumeric", max_steps=50, geodesic=None)
print(f"steps {info.steps}, cost {info.cost:.3e}, reason: {info.reason}")
print(f"max |w - w_true| = {(w - w_true).abs().max().item():.3e}")
