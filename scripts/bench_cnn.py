"""Benchmark: full Jacobian bounds of a CIFAR-sized CNN (issue: general graphs).

Network: 3x32x32 input, Conv(3->16, k4, s2, p1) - ReLU - Conv(16->32, k4, s2, p1) - ReLU -
Linear(2048 -> 10), PyTorch default init (seed 0), x0 uniform in [0, 1], l_inf eps 2/255, CROWN
pre-activation bounds.  Prints, for fastlip (the baseline, measured in the same process) and
recurjac: the pre-activation time, the Jacobian-bound time, the process's peak RSS growth during
the bound (VmHWM from /proc, reset before each call where the kernel allows it), and the
Lipschitz bounds (l_1 norm of each gradient row), with ratios to fastlip.

    python scripts/bench_cnn.py [--dtype float64|float32] [--threads N] [--eps E]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from rj_plugin.api import JacobianBounder


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cifar_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 8 * 8, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--eps", type=float, default=2 / 255)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    net = cifar_cnn().to(dtype).eval()
    start = time.perf_counter()
    bounder = JacobianBounder(net, input_shape=(3, 32, 32), dtype=dtype)
    print(f"build (auto_LiRPA graph, transformation, dense edges): "
          f"{time.perf_counter() - start:.1f}s; edges "
          + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in bounder.edges.items()), flush=True)
    x0 = torch.rand(1, 3, 32, 32, dtype=dtype)
    region = bounder.region(x0, args.eps, "inf")
    rows = {}
    for method in ("fastlip", "recurjac"):
        _reset_peak()
        before = _peak_rss_mb()
        jb = bounder.bound(region, preact="crown", method=method)
        rows[method] = (jb.timings["preact_s"], jb.timings["jacobian_s"],
                        _peak_rss_mb() - before, jb.lipschitz()[0])
        print(f"{method}: done in {jb.timings['jacobian_s']:.1f}s", flush=True)
    base = rows["fastlip"]
    print(f"{'method':9} {'preact_s':>8} {'jac_s':>8} {'t/fastlip':>9} {'rss_MB':>7} "
          f"{'mean L1-Lip':>11} {'L/fastlip':>9}")
    for method, (pre, jac, rss, lip) in rows.items():
        print(f"{method:9} {pre:8.2f} {jac:8.2f} {jac / base[1]:9.1f} {rss:7.0f} "
              f"{lip.mean().item():11.4g} {(lip / base[3]).mean().item():9.3f}")


if __name__ == "__main__":
    main()
