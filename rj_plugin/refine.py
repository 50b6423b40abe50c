r"""Refinement of local Lipschitz constants by branch and bound over input sub-boxes.

For one input region X (an l_inf ball or a box; an l_1 / l_2 ball through the sub-boxes of its
enclosing box) and the rows j of ``C f``, the local Lipschitz constant is

    L_j = sup_{x in X} || grad (C f)_j (x) ||_q            (q the dual norm of the region's p).

:func:`local_lipschitz` keeps a certified interval ``lower_j <= L_j <= upper_j`` and shrinks it:

* **upper**: X is covered by sub-boxes B_i; L_j <= max_i U_ij with U_ij any sound bound of the
  dual norm over B_i (here :meth:`JacobianBounds.lipschitz` of the chosen method, whose
  pre-activation bounds tighten as the boxes shrink).  The bound of the whole region from the
  first pass also holds, so upper_j = min(first pass, max_i U_ij).
* **lower**: ||grad (C f)_j (x)||_q at points x of X actually evaluated (autograd); every such
  value is attained, so it is a certified lower bound.  Points: the centre, the centres of every
  new sub-box and a few random points in it, and projected gradient ascent on the norm (useful
  for smooth activations; for ReLU nets the gradient is piecewise constant and the sampled
  points do the work).
* **branching**: best first.  A sub-box whose bound U_ij is below lower_j for every open row
  cannot raise the maximum and is dropped; of the others, the ``batch`` boxes with the largest
  U_ij / upper_j over the open rows are split in two along the input whose width times the
  largest Jacobian magnitude in its column (over the open rows) is largest; the two halves of
  every split box are bounded together in one call.
* a row stops when upper_j - lower_j <= rel_gap * upper_j; its bounds are frozen.  The whole
  search stops then, at ``time_limit`` or at ``max_boxes`` live boxes; the result says which.

``branching="neuron"`` (ReLU networks, l_inf / l_1 balls and boxes) splits unstable neurons
instead: the mixed-integer program of :func:`rj_plugin.exact_lipschitz` is solved by HiGHS's
branch and bound over the activation binaries (LP bounds at every node), within the time limit;
its dual bound is the upper value and its incumbent (an activation pattern with a point of the
region that realises it) the lower one.  HiGHS's bounds hold up to its feasibility tolerances
(1e-6), so the upper value is raised by a relative 1e-6 (and 1e-9 absolute) and
``certified_by`` says ``"milp"`` for those rows.  ``"auto"`` (the default) takes ``neuron``
where it applies and the program is within ``max_binaries``, then spends any time left on
input splitting seeded with its bounds; measured on the benchmark of
``scripts/bench_tightness.py``, neuron splitting converges much faster on ReLU nets.  HiGHS
does not interrupt its presolve and root LP at the time limit (measured: 14 s for a 1 s limit
on a 784-input program with about 850 binaries), so the rows after the time is spent get no
program, and the whole call can exceed ``time_limit`` by one program's overrun.

Sub-boxes of an l_1 / l_2 ball's enclosing box that miss the ball are dropped; those that meet it
are bounded as boxes (a superset of their part of the ball), and points for the lower bound are
projected onto the ball.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rj_plugin.api import METHODS, JacobianBounder, as_bounder
from rj_plugin.attacks import project
from rj_plugin.errors import InputError
from rj_plugin.lipschitz import dual_norm
from rj_plugin.lirpa import PREACT_METHODS
from rj_plugin.region import Region

__all__ = ["LocalLipschitz", "local_lipschitz"]


@dataclass
class LocalLipschitz:
    """Certified bounds of local Lipschitz constants, one per (batch entry, row).

    Attributes:
        upper: ``[B, rows]`` certified upper bounds of sup ||grad (C f)_j||_q over the region.
        lower: ``[B, rows]`` the largest gradient norms found (attained: certified lower bounds).
        first_upper: ``[B, rows]`` the one-pass bound of the whole region (before splitting).
        status: ``[B]``: ``"gap"`` (every row within ``rel_gap``), ``"time limit"`` or
            ``"box limit"``.
        boxes: ``[B]`` sub-boxes bounded.
        seconds: ``[B]`` wall-clock time.
        norm: the region's p (the constant is for the dual norm q).
    """

    upper: Tensor
    lower: Tensor
    first_upper: Tensor
    status: list[str]
    boxes: list[int]
    seconds: list[float]
    norm: float
    method: str = "linear"
    history: list[list[tuple[float, float, float]]] = field(default_factory=list)
    certified_by: list[list[str]] = field(default_factory=list)

    @property
    def gap(self) -> Tensor:
        """Relative gap (upper - lower) / upper, ``[B, rows]``."""
        return (self.upper - self.lower) / self.upper.abs().clamp(min=1e-300)


def gradient_norms(model: nn.Module, points: Tensor, C: Tensor | None, q: float) -> Tensor:
    """``|| grad (C f)_j (x_n) ||_q`` for points ``[N, *shape]``: ``[N, rows]`` (autograd, one
    backward pass per row)."""
    x = points.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x).flatten(1)
        if C is not None:
            out = out @ C.T
        norms = []
        for j in range(out.shape[1]):
            (grad,) = torch.autograd.grad(out[:, j].sum(), x, retain_graph=j + 1 < out.shape[1])
            norms.append(torch.linalg.vector_norm(grad.flatten(1), ord=q, dim=1))
    return torch.stack(norms, 1).detach()


def _ascent(model: nn.Module, starts: Tensor, lo: Tensor, hi: Tensor, region: Region,
            C: Tensor | None, q: float, steps: int) -> Tensor:
    """Projected sign-gradient ascent on sum_j ||grad (C f)_j||_q from ``starts`` ``[N, n]``
    within the boxes ``[lo, hi]`` (and the region's ball); returns the final points."""
    x = starts.clone()
    step = (hi - lo) / 8
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            out = model(x.reshape(-1, *region.center.shape[1:])).flatten(1)
            if C is not None:
                out = out @ C.T
            total = 0.0
            for j in range(out.shape[1]):
                (g,) = torch.autograd.grad(out[:, j].sum(), x, create_graph=True)
                total = total + torch.linalg.vector_norm(g, ord=q, dim=1).sum()
            if not total.requires_grad:  # piecewise-linear net: no curvature to follow
                return x.detach()
            (direction,) = torch.autograd.grad(total, x)
        x = torch.minimum(torch.maximum(x.detach() + step * direction.sign(), lo), hi)
        x = _into_ball(x, region)
    return x.detach()


def _into_ball(points: Tensor, region: Region) -> Tensor:
    """Project points ``[N, n]`` onto the region's l_p ball (boxes: unchanged)."""
    if region.eps is None or math.isinf(region.norm):
        return points
    center = region.center.flatten(1)
    return center + project(points - center, region.eps, region.norm)


def _meets_ball(lo: Tensor, hi: Tensor, region: Region) -> Tensor:
    """Which boxes ``[N, n]`` intersect the region's l_p ball: ``[N]`` (all for boxes)."""
    if region.eps is None or math.isinf(region.norm):
        return torch.ones(lo.shape[0], dtype=torch.bool, device=lo.device)
    center = region.center.flatten(1)
    gap = torch.maximum(torch.maximum(lo - center, center - hi), torch.zeros_like(lo))
    return torch.linalg.vector_norm(gap, ord=region.norm, dim=1) <= region.eps


def local_lipschitz(model: nn.Module | str | JacobianBounder, x0=None, eps=None, norm="inf", *,
                    lower=None, upper=None, C: Tensor | None = None, method: str = "linear",
                    preact: str = "crown", time_limit: float | None = 10.0,
                    rel_gap: float = 1e-3, batch: int = 32, max_boxes: int = 100_000,
                    ascent_steps: int = 10, seed: int = 0, branching: str = "auto",
                    max_binaries: int = 1500) -> LocalLipschitz:
    """Refine the local Lipschitz constants of the rows of ``C f`` over a region to a gap.

    Args:
        model: an ``nn.Module``, a path or demo name, or a prepared :class:`JacobianBounder`.
        x0, eps, norm: the l_p ball (p in {1, 2, inf}); or ``lower, upper`` (a box).
        C: ``[k, n_out]`` rows (default: the outputs).
        method: the bound of each sub-box: ``linear`` (default), ``recurjac`` or ``fastlip``.
        preact: pre-activation bounds of each sub-box (``crown`` by default).
        time_limit: seconds per input of the batch (None: until the gap or the box limit).
        rel_gap: stop a row when (upper - lower) <= rel_gap * upper.
        batch: sub-boxes split per step (their halves are bounded in one call).
        max_boxes: stop when this many sub-boxes are alive.
        ascent_steps: steps of gradient ascent from each new sub-box's centre.
        branching: ``input`` (sub-boxes), ``neuron`` (HiGHS over the activation binaries; ReLU
            only) or ``auto`` (neuron where it applies, then input splitting).
        max_binaries: the size limit of the neuron-splitting program.

    Returns:
        :class:`LocalLipschitz` (see the module docstring for the algorithm).
    """
    if branching not in ("auto", "input", "neuron"):
        raise InputError(f"unknown branching {branching!r}; choose from auto, input, neuron")
    if method not in METHODS or method == "interval":
        raise InputError(f"unknown method {method!r} for local_lipschitz; choose from linear, "
                         "recurjac, fastlip")
    if preact not in PREACT_METHODS:
        raise InputError(f"unknown pre-activation method {preact!r}; choose from "
                         f"{', '.join(PREACT_METHODS)}")
    if not (rel_gap >= 0 and math.isfinite(rel_gap)):
        raise InputError(f"rel_gap must be a finite number >= 0, got {rel_gap!r}")
    if batch < 1 or max_boxes < 2:
        raise InputError("batch must be >= 1 and max_boxes >= 2")
    if time_limit is not None and not time_limit > 0:
        raise InputError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    bounder = as_bounder(model, x0, lower)
    region = bounder.region(x0, eps, norm, lower, upper)
    if C is not None:
        C = torch.as_tensor(C, dtype=bounder.dtype, device=bounder.device)
    results = []
    for b in range(region.batch):
        sub = region.select(slice(b, b + 1))
        start = time.perf_counter()
        milp = None
        if branching != "input":
            milp = _neuron_split(bounder, sub, C, time_limit, max_binaries,
                                 required=branching == "neuron")
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if branching == "neuron" or (left is not None and left <= 0) or (
                milp is not None and milp[2]):
            results.append(_without_splitting(bounder, sub, C, method, preact, milp, rel_gap,
                                              start))
        else:
            results.append(_refine_one(bounder, sub, C, method, preact, left, rel_gap, batch,
                                       max_boxes, ascent_steps, seed, milp))
    return LocalLipschitz(torch.stack([r[0] for r in results]),
                          torch.stack([r[1] for r in results]),
                          torch.stack([r[2] for r in results]),
                          [r[3] for r in results], [r[4] for r in results],
                          [r[5] for r in results], region.norm, method,
                          [r[6] for r in results], [r[7] for r in results])


def _without_splitting(bounder: JacobianBounder, region: Region, C: Tensor | None, method: str,
                       preact: str, milp: tuple[Tensor, Tensor, bool] | None, rel_gap: float,
                       start: float) -> tuple:
    """The result without input splitting: the one-pass bound, the neuron-splitting program's
    bounds where there are some, and the gradient norm at the centre."""
    first = bounder.bound(region, preact=preact, method=method, C=C).lipschitz()[0]
    lower = gradient_norms(bounder.model, region.center, C, dual_norm(region.norm))[0]
    upper, by = first, ["bounds"] * first.shape[0]
    if milp is not None:
        upper = torch.minimum(first, milp[0])
        lower = torch.maximum(lower, milp[1])
        by = ["milp" if bool(m < f) else "bounds" for m, f in zip(milp[0], first, strict=True)]
    upper = torch.maximum(upper, lower)  # an attained value above the bound: keep it (rounding)
    status = "gap" if bool(((upper - lower) <= rel_gap * upper).all()) else "time limit"
    return upper, lower, first, status, 0, time.perf_counter() - start, [], by


def _neuron_split(bounder: JacobianBounder, region: Region, C: Tensor | None,
                  time_limit: float | None, max_binaries: int, required: bool
                  ) -> tuple[Tensor, Tensor, bool] | None:
    """(upper, lower, all rows optimal) from HiGHS's branch and bound over the activation
    binaries, or None where it does not apply (``required``: raise instead)."""
    from rj_plugin.errors import RJError
    from rj_plugin.exact import exact_lipschitz

    with torch.no_grad():
        n_out = bounder.model(region.center).flatten(1).shape[1]
    specs = C if C is not None else torch.eye(n_out, dtype=bounder.dtype, device=bounder.device)
    where = ({"lower": region.lower, "upper": region.upper} if region.is_box else
             {"x0": region.center, "eps": region.eps, "norm": region.norm})
    start = time.perf_counter()
    uppers, lowers, optimal = [], [], True
    for j in range(specs.shape[0]):  # one program per row; time left is shared by those left
        budget = None
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:  # out of time (a program overran): the other rows get no MILP bound
                uppers += [torch.tensor(math.inf, dtype=bounder.dtype)] * (len(specs) - j)
                lowers += [torch.tensor(0.0, dtype=bounder.dtype)] * (len(specs) - j)
                optimal = False
                break
            budget = max(0.1, left / (len(specs) - j))
        try:
            exact = exact_lipschitz(bounder, **where, C=specs[j:j + 1], time_limit=budget,
                                    max_binaries=max_binaries)
        except RuntimeError:  # HiGHS found no feasible point in time: no bound from it
            uppers.append(torch.tensor(math.inf, dtype=bounder.dtype))
            lowers.append(torch.tensor(0.0, dtype=bounder.dtype))
            optimal = False
            continue
        except RJError:  # not a ReLU net, or over the size limit
            if required:
                raise
            return None
        uppers.append(exact.upper[0, 0].to(bounder.dtype) * (1 + 1e-6) + 1e-9)
        lowers.append(exact.lower[0, 0].to(bounder.dtype))
        optimal = optimal and exact.status[0][0] == "optimal"
    device = bounder.device
    return torch.stack(uppers).to(device), torch.stack(lowers).to(device), optimal


def _refine_one(bounder: JacobianBounder, region: Region, C: Tensor | None, method: str,
                preact: str, time_limit: float | None, rel_gap: float, batch: int,
                max_boxes: int, ascent_steps: int, seed: int,
                seeded: tuple[Tensor, Tensor, bool] | None = None):
    """Branch and bound for one input (``region.batch == 1``); see :func:`local_lipschitz`."""
    start = time.perf_counter()
    deadline = math.inf if time_limit is None else start + time_limit
    p, q = region.norm, dual_norm(region.norm)
    shape = region.center.shape[1:]
    model = bounder.model
    gen = torch.Generator().manual_seed(seed)

    def bound_boxes(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        sub = bounder.region(lower=lo.reshape(-1, *shape), upper=hi.reshape(-1, *shape))
        jb = bounder.bound(sub, preact=preact, method=method, C=C)
        mag = torch.maximum(jb.lower.abs(), jb.upper.abs()).flatten(2)  # [N, rows, n]
        return jb.lipschitz(norm=p), mag

    def evaluate(points: Tensor) -> Tensor:
        return gradient_norms(model, points.reshape(-1, *shape), C, q).amax(0)

    first = bounder.bound(region, preact=preact, method=method, C=C)
    first_upper = first.lipschitz()[0]
    bound_upper = first_upper if seeded is None else torch.minimum(first_upper, seeded[0])
    center = region.center.flatten(1)
    if region.eps is not None:  # the ball's enclosing box
        box_lo, box_hi = center - region.eps, center + region.eps
    else:
        box_lo, box_hi = region.lower.flatten(1), region.upper.flatten(1)
    lower = evaluate(center)
    if seeded is not None:
        lower = torch.maximum(lower, seeded[1])
    rows = lower.shape[0]
    lo, hi = box_lo, box_hi
    if math.isinf(p):  # the region is its own box
        ub = first_upper[None]
        mag = torch.maximum(first.lower.abs(), first.upper.abs()).flatten(2)
    else:
        ub, mag = bound_boxes(lo, hi)
    frozen_upper = torch.full((rows,), math.nan, dtype=lower.dtype, device=lower.device)
    n_boxes, status = 1, "time limit"
    history = [(time.perf_counter() - start, float(bound_upper.max()), float(lower.max()))]
    while True:
        live_max = ub.amax(0) if ub.shape[0] else lower
        upper = torch.maximum(torch.minimum(bound_upper, live_max), lower)
        upper = torch.where(frozen_upper.isnan(), upper, frozen_upper)
        done = (upper - lower) <= rel_gap * upper
        frozen_upper = torch.where(done & frozen_upper.isnan(), upper, frozen_upper)
        history.append((time.perf_counter() - start, float(upper.max()), float(lower.max())))
        if bool(done.all()):
            status = "gap"
            break
        if time.perf_counter() >= deadline:
            break
        open_rows = ~done
        useful = (ub[:, open_rows] > lower[open_rows]).any(1)
        lo, hi, ub, mag = lo[useful], hi[useful], ub[useful], mag[useful]
        if lo.shape[0] == 0:  # every box is below what was found: lower is the answer
            continue
        if lo.shape[0] + batch > max_boxes:
            status = "box limit"
            break
        score = (ub[:, open_rows] / upper[open_rows].clamp(min=1e-300)).amax(1)
        pick = score.topk(min(batch, lo.shape[0])).indices
        keep = torch.ones(lo.shape[0], dtype=torch.bool, device=lo.device)
        keep[pick] = False
        s_lo, s_hi = lo[pick], hi[pick]
        width = s_hi - s_lo
        dim = (width * mag[pick][:, open_rows].amax(1)).argmax(1)
        mid = (s_lo.gather(1, dim[:, None]) + s_hi.gather(1, dim[:, None])) / 2
        left_hi, right_lo = s_hi.clone(), s_lo.clone()
        left_hi.scatter_(1, dim[:, None], mid)
        right_lo.scatter_(1, dim[:, None], mid)
        new_lo, new_hi = torch.cat([s_lo, right_lo]), torch.cat([left_hi, s_hi])
        meets = _meets_ball(new_lo, new_hi, region)
        new_lo, new_hi = new_lo[meets], new_hi[meets]
        if new_lo.shape[0]:
            new_ub, new_mag = bound_boxes(new_lo, new_hi)
            n_boxes += new_lo.shape[0]
            mids = (new_lo + new_hi) / 2
            rand = new_lo + (new_hi - new_lo) * torch.rand(
                new_lo.shape, generator=gen, dtype=new_lo.dtype).to(new_lo.device)
            points = _into_ball(torch.cat([mids, rand]), region)
            if ascent_steps:
                points = torch.cat([points, _ascent(
                    model, mids, new_lo, new_hi, region, C, q, ascent_steps)])
            lower = torch.maximum(lower, evaluate(points))
            lo = torch.cat([lo[keep], new_lo])
            hi = torch.cat([hi[keep], new_hi])
            ub = torch.cat([ub[keep], new_ub])
            mag = torch.cat([mag[keep], new_mag])
        else:
            lo, hi, ub, mag = lo[keep], hi[keep], ub[keep], mag[keep]
    upper = torch.where(frozen_upper.isnan(), upper, frozen_upper)
    by = "milp+bounds" if seeded is not None else "bounds"
    return (upper, lower, first_upper, status, n_boxes, time.perf_counter() - start, history,
            [by] * rows)
