"""PNG plots of run results (matplotlib, Agg canvas; no pyplot state, no display needed).

Every function takes plain numbers/arrays and a target path, draws one figure and writes it
atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rj_plugin.io.results import new_file_mode

__all__ = [
    "as_image",
    "global_bars",
    "lipschitz_curve",
    "monotonicity_grid",
    "radii_bars",
    "stationary_scan",
    "width_heatmaps",
]


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; give open()'s mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def as_image(values: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """A 2-D view of per-input-element values (``[prod(input_shape)]``) for a heat map.

    Size-1 dimensions are dropped; 2+ remaining dimensions stack into ``[-1, last]`` (channels
    one above the other); a vector becomes a square when its length is a perfect square, else a
    single row.
    """
    dims = [d for d in input_shape if d > 1]
    flat = np.asarray(values, dtype=float).reshape(-1)
    if len(dims) >= 2:
        return flat.reshape(-1, dims[-1])
    side = math.isqrt(flat.size)
    if side * side == flat.size and side > 1:
        return flat.reshape(side, side)
    return flat.reshape(1, -1)


def width_heatmaps(panels: list[tuple[str, np.ndarray]], path: Path, title: str) -> Path:
    """One heat map per panel ``(caption, 2-D array of bound widths U - L)``."""
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3.2 * cols + 0.6, 3.0 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, (caption, img) in zip(axes, panels, strict=False):
        im = ax.imshow(img, cmap="viridis", aspect="auto" if img.shape[0] == 1 else "equal")
        ax.set_title(caption, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lipschitz_curve(eps: Sequence[float], curves: dict[str, Sequence[float]], path: Path,
                    title: str, global_ref: dict[str, float] | None = None,
                    naive_ref: dict[str, float] | None = None,
                    at_zero: dict[str, float] | None = None) -> Path:
    """Log-log local Lipschitz bound vs radius, one line per row (paper's Figure 3 style).

    ``global_ref``: the whole-space bound per row (dashed); ``naive_ref``: the product of
    operator norms per row (dotted); ``at_zero``: the value at eps = 0 (the true gradient norm),
    drawn as a marker at the left edge.  Radii <= 0 are left out of the log axis.
    """
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    xs = np.asarray(eps, dtype=float)
    keep = xs > 0
    for i, (name, ys) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ys = np.asarray(ys, dtype=float)
        ax.loglog(xs[keep], ys[keep], "o-", color=color, ms=3, label=f"{name} (local bound)")
        if global_ref and name in global_ref:
            ax.axhline(global_ref[name], color=color, ls="--", lw=1,
                       label=f"{name} global bound")
        if naive_ref and name in naive_ref:
            ax.axhline(naive_ref[name], color=color, ls=":", lw=1,
                       label=f"{name} operator-norm product")
        if at_zero and name in at_zero and keep.any():
            ax.plot([xs[keep].min()], [at_zero[name]], marker="<", color=color, ms=7, ls="none",
                    label=f"{name} at eps=0")
    ax.set_xlabel("radius eps")
    ax.set_ylabel("Lipschitz bound")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def global_bars(rows: Sequence[str], values: dict[str, Sequence[float]], path: Path,
                title: str) -> Path:
    """Grouped bars (log scale): one group per row, one bar per method / reference."""
    fig = _figure(max(5.0, 0.7 * len(rows) * max(1, len(values)) * 0.5 + 2), 4.0)
    ax = fig.subplots()
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(values))
    for i, (name, vals) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, list(rows), rotation=45 if len(rows) > 6 else 0, fontsize=8)
    ax.set_ylabel("global Lipschitz bound")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _save(fig, path)


def radii_bars(inputs: Sequence[str], radii: dict[str, Sequence[float]],
               pgd: Sequence[float | None], path: Path, title: str) -> Path:
    """Certified radius per input and method (bars) with the PGD radius (black markers)."""
    fig = _figure(max(5.0, 0.9 * len(inputs) + 2), 4.2)
    ax = fig.subplots()
    x = np.arange(len(inputs))
    width = 0.8 / max(1, len(radii))
    for i, (name, vals) in enumerate(radii.items()):
        ax.bar(x + (i - (len(radii) - 1) / 2) * width, vals, width, label=name)
    px = [xi for xi, v in zip(x, pgd, strict=True) if v is not None and math.isfinite(v)]
    py = [v for v in pgd if v is not None and math.isfinite(v)]
    if px:
        ax.plot(px, py, "k_", ms=18, mew=2, ls="none", label="PGD (adversarial found)")
    ax.set_xticks(x, list(inputs), rotation=45 if len(inputs) > 6 else 0, fontsize=8)
    ax.set_ylabel("radius")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def stationary_scan(curves: list[tuple[str, Sequence[float], Sequence[int], Sequence[float]]],
                    dim: int, path: Path, title: str) -> Path:
    """Per input ``(name, radii, n_uns, lipschitz)``: uncertain-sign count and Lipschitz bound
    against the radius (left: n_uns with the input dimension d as a line; right: log bound)."""
    fig = _figure(10.0, 4.0)
    left, right = fig.subplots(1, 2)
    for i, (name, radii, n_uns, lips) in enumerate(curves):
        left.plot(radii, n_uns, "o-", ms=3, color=f"C{i % 10}", label=name)
        right.semilogy(radii, lips, "o-", ms=3, color=f"C{i % 10}", label=name)
    left.axhline(dim, color="k", ls="--", lw=1, label=f"d = {dim}")
    left.set_xlabel("radius")
    left.set_ylabel("entries of uncertain sign")
    right.set_xlabel("radius")
    right.set_ylabel("Lipschitz bound")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


#: Category -> (code, colour) of :func:`monotonicity_grid`.
MONOTONE_CATEGORIES = {
    "unknown": (0, "#d0d0d0"),
    "non-decreasing": (1, "#2ca02c"),
    "non-increasing": (2, "#1f77b4"),
    "constant": (3, "#9467bd"),
    "refuted": (4, "#d62728"),
}


def monotonicity_grid(status: np.ndarray, row_names: Sequence[str],
                      feature_names: Sequence[str], path: Path, title: str) -> Path:
    """A rows x features grid of category codes (see ``MONOTONE_CATEGORIES``)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = [c for _, c in sorted(MONOTONE_CATEGORIES.values())]
    fig = _figure(min(16.0, 2.5 + 0.25 * len(feature_names)),
                  min(12.0, 1.8 + 0.3 * len(row_names)))
    ax = fig.subplots()
    ax.imshow(status, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5,
              aspect="auto", interpolation="nearest")
    if len(feature_names) <= 40:
        ax.set_xticks(range(len(feature_names)), list(feature_names), rotation=90, fontsize=7)
    ax.set_yticks(range(len(row_names)), list(row_names), fontsize=7)
    ax.set_xlabel("input feature")
    ax.set_ylabel("output row")
    handles = [Patch(color=c, label=name) for name, (_, c) in MONOTONE_CATEGORIES.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
