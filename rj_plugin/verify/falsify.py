r"""Stage 1: search for counterexamples (random points, box corners, PGD).

For one unsafe disjunct ``C y <= d`` (``C: [k, m]``, ``d: [k]``) the violation of an input is

    v(x) = max_i (C f(x) - d)_i,        x is a counterexample  <=>  v(x) <= 0,

and the search minimises ``v`` over the input box.  All points of all boxes are evaluated as one
batch ``[N, n]`` through the float64 torch model; candidates (``v`` at most a small positive
slack, since the torch model and onnxruntime differ by float32 rounding) are handed, best first,
to :func:`rj_plugin.verify.witness.recheck`, which alone decides.

PGD runs sign-gradient steps on ``v`` (the sub-gradient of the max), projected by clamping into
the box, from the centre, the corners the gradient points to and random starts, with the step
shrinking geometrically from a quarter of the box width; it keeps optimising past ``v = 0`` so
that the point lands inside the unsafe set with some margin for float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

ModelFn = Callable[[Tensor], Tensor]


def violation(model: ModelFn, x: Tensor, C: Tensor, d: Tensor) -> Tensor:
    """``v(x) = max_i (C f(x) - d)_i`` for ``x: [N, n]``, ``C: [k, m]``, ``d: [k]`` -> ``[N]``
    (``-inf`` when k = 0: every output is unsafe)."""
    y = model(x)
    if C.shape[0] == 0:
        return torch.full((x.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
    return (y @ C.T - d).max(dim=1).values


def candidate_slack(d: Tensor) -> float:
    """Violations up to this are re-checked on onnxruntime (float32 rounding of the net)."""
    return 1e-4 * (1.0 + float(d.abs().max())) if d.numel() else 0.0


def random_points(lower: Tensor, upper: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """The centre, ``n`` uniform points and ``n`` random vertices of the box ``[n_in]`` ->
    ``[2n + 1, n_in]``."""
    u = torch.rand(2 * n, lower.numel(), dtype=lower.dtype, generator=gen).to(lower.device)
    u[n:] = (u[n:] > 0.5).to(lower.dtype)
    return torch.cat([((lower + upper) / 2)[None], lower + u * (upper - lower)])


def best_candidates(x: Tensor, v: Tensor, slack: float, limit: int = 16) -> np.ndarray:
    """Points with ``v <= slack``, best (smallest v) first: ``[<=limit, n]`` float64 numpy."""
    keep = torch.nonzero(v <= slack).flatten()
    if keep.numel() == 0:
        return np.zeros((0, x.shape[1]))
    order = keep[torch.argsort(v[keep])][:limit]
    return x[order].detach().cpu().numpy().astype(np.float64)


def pgd(model: ModelFn, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor, *, steps: int,
        restarts: int, gen: torch.Generator, should_stop: Callable[[], bool] | None = None
        ) -> tuple[Tensor, Tensor]:
    """Minimise ``v`` over each box of a batch by projected sign-gradient descent.

    Args:
        lower, upper: ``[B, n]`` boxes (one disjunct's ``C: [k, m]``, ``d: [k]`` for all).
        steps: iterations per start; restarts: starts per box (the centre, then random points).
        should_stop: polled every few steps (deadline).

    Returns:
        ``(x_best [B, n], v_best [B])``: the best point found in each box and its violation.
    """
    B, n = lower.shape
    width = upper - lower
    starts = torch.rand(B, max(restarts, 1), n, dtype=lower.dtype, generator=gen)
    starts = starts.to(lower.device)
    starts[:, 0] = 0.5
    x = (lower[:, None] + starts * width[:, None]).reshape(-1, n)
    lo = lower[:, None].expand(B, max(restarts, 1), n).reshape(-1, n)
    hi = upper[:, None].expand(B, max(restarts, 1), n).reshape(-1, n)
    w = hi - lo
    best_x, best_v = x.clone(), torch.full((x.shape[0],), torch.inf, dtype=x.dtype,
                                           device=x.device)
    decay = 0.02 ** (1.0 / max(steps, 1))  # step size from width/4 down to width/200
    step = 0.25
    for it in range(steps + 1):
        x = x.detach().requires_grad_(True)
        v = violation(model, x, C, d)
        with torch.no_grad():
            better = v < best_v
            best_x[better], best_v[better] = x[better].detach(), v[better].detach()
        if it == steps or (should_stop is not None and it % 5 == 0 and should_stop()):
            break
        (grad,) = torch.autograd.grad(v.sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - step * w * grad.sign(), lo), hi)
        step *= decay
    best_v = best_v.reshape(B, -1)
    idx = best_v.argmin(dim=1)
    rows = torch.arange(B, device=lower.device)
    return best_x.reshape(B, -1, n)[rows, idx], best_v[rows, idx]
