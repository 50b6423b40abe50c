"""``rj demo``: certified Jacobian bounds and local Lipschitz constants on the digits MLPs.

For each bundled model (64-32-32-10 ReLU and tanh MLPs trained on scikit-learn's handwritten
digits) and a few test images, it prints, per l_inf radius eps, the certified local Lipschitz
constant (l_1 norm of the gradient) of the predicted class's logit by RecurJac and by Fast-Lip,
the share of Jacobian entries whose sign is certified, and, as references, the global bound
(whole input space) and the product of operator norms.
"""

from __future__ import annotations

import time

import torch

from rj_plugin.api import JacobianBounder
from rj_plugin.data import load_digits_split
from rj_plugin.models import DEMO_MODELS


def run_demo(images: int = 3, eps_values: list[float] | None = None) -> int:
    eps_values = eps_values if eps_values is not None else [0.0, 0.01, 0.03, 0.1]
    x, y = load_digits_split("test")
    x, y = x[:images], y[:images]
    for name in DEMO_MODELS:
        start = time.perf_counter()
        bounder = JacobianBounder(name)
        with torch.no_grad():
            pred = bounder.model(x).argmax(1)
        rows = torch.nn.functional.one_hot(pred, 10).to(x.dtype)[:, None, :]  # [B, 1, 10]
        print(f"\n== {name}: {bounder.chain.describe().count('sigma')} activation layers, "
              f"{images} test images, l_inf balls; Lipschitz = bound on ||grad f_pred||_1")
        header = f"{'eps':>7} " + " ".join(
            f"| img{i} (y={int(y[i])},pred={int(pred[i])}) RJ / FL / sign%" for i in range(images))
        print(header)
        for eps in eps_values:
            region = bounder.region(x, eps, "inf")
            cells = []
            rj_b = bounder.bound(region, preact="crown", method="recurjac", C=rows)
            fl_b = bounder.bound(region, preact="crown", method="fastlip", C=rows)
            rj_l, fl_l = rj_b.lipschitz()[:, 0], fl_b.lipschitz()[:, 0]
            signed = ((rj_b.lower > 0) | (rj_b.upper < 0)).flatten(1).float().mean(1) * 100
            for i in range(images):
                cells.append(f"{rj_l[i]:>10.3f} / {fl_l[i]:>8.3f} / {signed[i]:5.1f}%")
            print(f"{eps:>7.3g} | " + " | ".join(cells))
        glob = bounder.bound(bounder.region(x, unbounded=True), method="recurjac", C=rows)
        naive = glob.operator_norm_product()
        print(f"global (whole input space) RecurJac bound: "
              + ", ".join(f"{v:.3f}" for v in glob.lipschitz()[:, 0].tolist())
              + f"; product of operator norms: "
              + ", ".join(f"{v:.3f}" for v in naive.reshape(images, -1)[:, 0].tolist())
              + f"  ({time.perf_counter() - start:.1f}s)")
    return 0
