"""``rj demo``: the ``robustness`` task of ``configs/demo.yaml`` on the bundled digits MLP.

For a few test images of scikit-learn's digits, the 64-32-32-10 ReLU MLP ``digits-relu`` gets,
per image: the label, the certified Lipschitz bound of its margins on the l_inf ball of radius
``specification.eps``, the largest certified l_inf radius by RecurJac's Lipschitz integral and by
CROWN's margin lower bound (and the best of both), and the smallest adversarial radius PGD finds
(an upper reference).  Results (JSON, CSV, the resolved config and a bar chart of the radii) go
to ``results/demo``.

The configuration is read from ``configs/demo.yaml`` of the source tree when it is there (an
editable install or a clone); otherwise the identical :data:`DEMO_CONFIG` below is used (a test
keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from rj_plugin.config import load_config

#: The contents of ``configs/demo.yaml``.
DEMO_CONFIG: dict[str, Any] = {
    "general": {"device": "cpu", "dtype": "float64", "seed": 0, "results_dir": "results/demo"},
    "model": {"name": "digits-relu"},
    "data": {"source": "digits", "split": "test", "start": 0, "end": 5},
    "specification": {"region": "ball", "norm": "inf", "eps": 0.01, "output": "margins"},
    "bounds": {"method": "crown"},
    "jacobian": {"method": "recurjac"},
    "task": {"name": "robustness", "methods": ["integral", "crown"], "lipsteps": 8,
             "steps": 10, "tolerance": 1e-3, "pgd": True, "pgd_steps": 20,
             "pgd_restarts": 3, "pgd_search_steps": 8},
}


def demo_config_path() -> Path | None:
    """``configs/demo.yaml`` next to the package in a source tree, or None."""
    path = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    return path if path.is_file() else None


def run_demo(overrides: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run the demo configuration with ``--set`` style overrides; return the exit status."""
    from rj_plugin.tasks.runner import run

    path = demo_config_path()
    if path is not None:
        cfg = load_config(path, overrides)
    else:
        cfg = load_config(None, overrides, raw=DEMO_CONFIG)
    code, _ = run(cfg, out)
    return code
