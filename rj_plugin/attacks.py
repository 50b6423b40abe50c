r"""Adversarial search in l_p balls: projections, sampling and PGD.

These give *upper* references for certified radii: an input x with ``||x - x0||_p = r`` and a
violated specification (some row of ``C f(x)`` below 0) proves that no certificate can exceed r.

* :func:`project` -- Euclidean projection of offsets onto ``B_p(0, eps)``, p in {1, 2, inf}
  (l_1: onto the simplex of the magnitudes, sort-based).
* :func:`sample_ball` -- uniform points of ``B_p(x0, eps)``.
* :func:`pgd` -- projected gradient descent on ``m(x) = min_i (C f(x))_i`` over the ball, with
  random restarts batched; steepest-descent steps for the norm (sign for l_inf, normalised
  gradient for l_2, the largest-magnitude coordinates for l_1).
* :func:`smallest_adversarial_radius` -- PGD at shrinking / growing radii, then bisection; returns
  the smallest ``||x_adv - x0||_p`` found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

ModelFn = Callable[[Tensor], Tensor]


def project(delta: Tensor, eps: float, p: float) -> Tensor:
    """Project offsets ``delta: [N, *shape]`` onto ``{||d||_p <= eps}`` (row-wise), same shape."""
    flat = delta.flatten(1)
    if math.isinf(p):
        flat = flat.clamp(-eps, eps)
    elif p == 2:
        norm = flat.norm(dim=1, keepdim=True)
        flat = flat * torch.clamp(eps / norm.clamp(min=torch.finfo(flat.dtype).tiny), max=1.0)
    else:
        mag = flat.abs()
        outside = mag.sum(1) > eps
        if outside.any():
            sorted_mag, _ = torch.sort(mag[outside], dim=1, descending=True)
            cumsum = sorted_mag.cumsum(1) - eps
            ranks = torch.arange(1, flat.shape[1] + 1, dtype=flat.dtype, device=flat.device)
            count = ((sorted_mag - cumsum / ranks) > 0).sum(1, keepdim=True)
            theta = cumsum.gather(1, count - 1) / count
            flat = flat.clone()
            flat[outside] = flat[outside].sign() * (mag[outside] - theta).clamp(min=0)
    return flat.reshape(delta.shape)


def lp_norm(delta: Tensor, p: float) -> Tensor:
    """``||delta_n||_p`` for ``delta: [N, *shape]`` -> ``[N]``."""
    return torch.linalg.vector_norm(delta.flatten(1), ord=p, dim=1)


def sample_ball(center: Tensor, eps: float, p: float, n: int, gen: torch.Generator) -> Tensor:
    """``n`` uniform points of ``B_p(center, eps)``; ``center: [*shape]`` -> ``[n, *shape]``."""
    dim = center.numel()
    opts = {"dtype": center.dtype, "device": "cpu", "generator": gen}
    if math.isinf(p):
        d = (2 * torch.rand(n, dim, **opts) - 1) * eps
    elif p == 2:
        g = torch.randn(n, dim, **opts)
        r = torch.rand(n, 1, **opts) ** (1.0 / dim)
        d = g / g.norm(dim=1, keepdim=True).clamp(min=1e-300) * r * eps
    else:
        e = -torch.log(torch.rand(n, dim + 1, **opts))
        d = e[:, :dim] / e.sum(1, keepdim=True) * torch.sign(torch.randn(n, dim, **opts)) * eps
    return center + d.to(center.device).reshape(n, *center.shape)


def sample_box(lower: Tensor, upper: Tensor, n: int, gen: torch.Generator,
               corners: bool = False) -> Tensor:
    """``n`` uniform points (or random corners) of the box ``[lower, upper]`` -> ``[n, *shape]``."""
    u = torch.rand(n, *lower.shape, dtype=lower.dtype, generator=gen).to(lower.device)
    if corners:
        u = (u > 0.5).to(lower.dtype)
    return lower + u * (upper - lower)


def margins(model: ModelFn, x: Tensor, C: Tensor) -> Tensor:
    """``C f(x)`` for a batch: ``x: [N, *shape]``, ``C: [k, n_out]`` -> ``[N, k]``."""
    return model(x) @ C.T


def steepest_direction(grad: Tensor, p: float) -> Tensor:
    """The unit-l_p-norm direction that most increases a linear function with gradient grad."""
    flat = grad.flatten(1)
    if math.isinf(p):
        step = flat.sign()
    elif p == 2:
        step = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-300)
    else:  # l1: move the top ~5% coordinates, spread evenly
        k = max(1, flat.shape[1] // 20)
        top = flat.abs().topk(k, dim=1).indices
        step = torch.zeros_like(flat)
        step.scatter_(1, top, flat.gather(1, top).sign() / k)
    return step.reshape(grad.shape)


@dataclass
class AttackResult:
    """One PGD attack at radius ``eps``.

    Attributes:
        found: whether some point had a row of ``C f`` below 0.
        x_adv: the violating point ``[*shape]`` closest to x0 (None if none).
        distance: ``||x_adv - x0||_p`` (inf if none).
        best_margin: the smallest ``min_i (C f(x))_i`` seen.
    """

    found: bool
    x_adv: Tensor | None
    distance: float
    best_margin: float


def pgd(model: ModelFn, x0: Tensor, C: Tensor, eps: float, p: float, *, steps: int = 50,
        restarts: int = 5, gen: torch.Generator | None = None) -> AttackResult:
    """PGD minimising ``m(x) = min_i (C f(x))_i`` over ``B_p(x0, eps)``.

    Args:
        model: maps ``[N, *shape]`` to ``[N, n_out]`` (differentiable).
        x0: ``[*shape]``; C: ``[k, n_out]``.
        steps: iterations; the step is ``2.5 eps / steps`` (steepest descent for the norm).
        restarts: parallel starts: x0 itself and ``restarts - 1`` uniform points of the ball.
    """
    gen = gen or torch.Generator().manual_seed(0)
    starts = [x0[None]]
    if restarts > 1:
        starts.append(sample_ball(x0, eps, p, restarts - 1, gen))
    x = torch.cat(starts).detach()
    alpha = 2.5 * eps / steps
    best = math.inf
    found: list[Tensor] = []
    for it in range(steps + 1):
        x.requires_grad_(True)
        m = margins(model, x, C).min(dim=1).values
        with torch.no_grad():
            best = min(best, float(m.min()))
            bad = m < 0
            if bad.any():
                found.append(x[bad].detach().clone())
                break
        if it == steps:
            break
        (grad,) = torch.autograd.grad(m.sum(), x)
        with torch.no_grad():
            delta = project(x - alpha * steepest_direction(grad, p) - x0, eps, p)
            x = (x0 + delta).detach()
    if not found:
        return AttackResult(False, None, math.inf, best)
    cand = torch.cat(found)
    dist = lp_norm(cand - x0, p)
    i = int(dist.argmin())
    return AttackResult(True, cand[i], float(dist[i]), best)


@dataclass
class RadiusSearch:
    """Result of :func:`smallest_adversarial_radius`.

    Attributes:
        radius: the smallest ``||x_adv - x0||_p`` of a violating point found (inf if none).
        x_adv: that point (None if none).
        attacks: ``(eps, found, distance)`` per attack, in order.
    """

    radius: float
    x_adv: Tensor | None
    attacks: list[tuple[float, bool, float]] = field(default_factory=list)


def smallest_adversarial_radius(model: ModelFn, x0: Tensor, C: Tensor, p: float, start: float,
                                *, search_steps: int = 12, max_radius: float = 1e5,
                                steps: int = 50, restarts: int = 5,
                                gen: torch.Generator | None = None) -> RadiusSearch:
    """Search the smallest radius at which PGD finds a violation of ``C f(x) >= 0``.

    Halve the radius while attacks succeed (or double it, up to ``max_radius``, until one does),
    then bisect between the largest failed and the smallest successful radius.  Every attack
    counts towards ``search_steps``.  If ``C f(x0)`` already has a negative row the radius is 0.
    """
    gen = gen or torch.Generator().manual_seed(0)
    with torch.no_grad():
        if float(margins(model, x0[None], C).min()) < 0:
            return RadiusSearch(0.0, x0.clone(), [(0.0, True, 0.0)])
    result = RadiusSearch(math.inf, None)
    lo, r = 0.0, start
    for _ in range(search_steps):
        att = pgd(model, x0, C, r, p, steps=steps, restarts=restarts, gen=gen)
        result.attacks.append((r, att.found, att.distance))
        if att.found:
            if att.distance < result.radius:
                result.radius, result.x_adv = att.distance, att.x_adv
            hi = result.radius
            r = hi / 2 if lo == 0.0 else (lo + hi) / 2
        else:
            lo = max(lo, r)
            if math.isinf(result.radius):
                if r >= max_radius:
                    break
                r = min(2 * r, max_radius)
            else:
                r = (lo + result.radius) / 2
        if not math.isinf(result.radius) and result.radius - lo <= 1e-6 * result.radius:
            break
    return result
