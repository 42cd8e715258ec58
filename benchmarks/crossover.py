"""Where the torch backend's separable product stops beating scatter + irfft2 (and the same for
the coefficient gradient). Prints median milliseconds per path and the measured crossover K;
the constants of the cost model in lfma_kernels/ops/torch_ops.py come from this table, and the
last two columns show what that model picks (sep or fft) for dW and for the gradient.

    python benchmarks/crossover.py [--device cuda]
"""
from __future__ import annotations

import argparse
import torch

from lfma_kernels.ops import torch_ops as T
from timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="768x768,1024x1024,768x3072,4096x4096")
    args = parser.parse_args()
    ks = [4, 8, 16, 24, 32, 48, 64, 96, 128, 176, 256, 384]
    print(f"{'shape':>10} {'K':>5} {'sep ms':>8} {'fft ms':>8} {'gsep ms':>8} {'gfft ms':>8}  dW  grad")
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.split("x"))
        g = torch.randn(shape, device=args.device)
        for k in ks:
            rows = torch.randint(0, shape[0], (k,), device=args.device)
            cols = torch.randint(0, shape[1], (k,), device=args.device)
            c = torch.randn(k, 2, device=args.device)
            sep = median_ms(lambda: T.delta_weight_separable(c, rows, cols, shape, 1.0))
            fft = median_ms(lambda: T.delta_weight_fft(c, rows, cols, shape, 1.0))
            gsep = median_ms(lambda: T.coeff_grad_separable(g, rows, cols, 1.0))
            gfft = median_ms(lambda: T.coeff_grad_fft(g, rows, cols, 1.0))
            pick = "sep" if T.use_separable(k, shape) else "fft"
            gpick = "sep" if T.use_separable(k, shape, inverse=False) else "fft"
            print(f"{spec:>10} {k:>5} {sep:8.3f} {fft:8.3f} {gsep:8.3f} {gfft:8.3f}  {pick:>3}  {gpick:>4}")


if __name__ == "__main__":
    main()
