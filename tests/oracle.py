"""The ground truth that every bound is tested against: true Jacobians at many points.

Points of a region are drawn three ways:
* uniformly at random in the ball / box;
* vertices of the box (all of them when few, a random subset otherwise) and, for l_1 / l_2
  balls, the points x0 +- eps e_k;
* adversarially: projected gradient ascent on one Jacobian entry (both signs) and on the dual
  norm of one gradient row, the quantities the bounds claim to contain.  (For piecewise-linear
  networks the Jacobian is piecewise constant and has no useful gradient; random points and
  vertices carry the test there.)

This module deliberately uses nothing from ``rj_plugin`` (its projections repeat the formulas of
``rj_plugin.attacks``), so that a bug in the library cannot hide in the ground truth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def jacobians(model: nn.Module, xs: Tensor) -> Tensor:
    """d model / d x at every point: xs ``[N, *in]`` -> ``[N, n_out, *in]`` (torch.func)."""
    def single(x: Tensor) -> Tensor:
        return model(x.unsqueeze(0)).squeeze(0)

    return torch.func.vmap(torch.func.jacrev(single))(xs)


def project(x: Tensor, center: Tensor, eps: float, p: float) -> Tensor:
    """Euclidean projection of points ``[N, *in]`` onto the l_p ball (p in 1, 2, inf)."""
    d = (x - center).flatten(1)
    if math.isinf(p):
        d = d.clamp(-eps, eps)
    elif p == 2:
        norm = d.norm(dim=1, keepdim=True).clamp(min=1e-300)
        d = d * torch.clamp(eps / norm, max=1.0)
    else:  # l1: project |d| onto the simplex of radius eps where outside (Duchi et al. 2008)
        a = d.abs()
        outside = a.sum(1) > eps
        if outside.any():
            u, _ = torch.sort(a[outside], dim=1, descending=True)
            css = u.cumsum(1) - eps
            idx = torch.arange(1, u.shape[1] + 1, dtype=u.dtype, device=u.device)
            rho = ((u - css / idx) > 0).sum(1, keepdim=True)
            theta = css.gather(1, rho - 1) / rho
            a_out = (a[outside] - theta).clamp(min=0)
            d[outside] = d[outside].sign() * a_out
    return center + d.reshape(x.shape)


def random_points(center: Tensor, eps: float, p: float, n: int, gen: torch.Generator) -> Tensor:
    """``n`` points of the l_p ball around ``center`` (``[*in]``): ``[n, *in]``."""
    shape, dim = center.shape, center.numel()
    opts = {"dtype": center.dtype, "device": center.device, "generator": gen}
    if math.isinf(p):
        d = (2 * torch.rand(n, dim, **opts) - 1) * eps
    elif p == 2:
        g = torch.randn(n, dim, **opts)
        r = torch.rand(n, 1, **opts) ** (1.0 / dim)
        d = g / g.norm(dim=1, keepdim=True) * r * eps
    else:
        e = -torch.log(torch.rand(n, dim + 1, **opts))  # uniform in the l1 ball
        d = (e[:, :dim] / e.sum(1, keepdim=True)) * torch.sign(torch.randn(n, dim, **opts)) * eps
    return center + d.reshape(n, *shape)


def box_points(lower: Tensor, upper: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Uniform points of a box ``[*in]``: ``[n, *in]``."""
    u = torch.rand(n, *lower.shape, dtype=lower.dtype, device=lower.device, generator=gen)
    return lower + u * (upper - lower)


def vertices(center: Tensor, eps: float, p: float, gen: torch.Generator,
             limit: int = 1024) -> Tensor:
    """Extreme points of the ball: box corners (all if <= limit) or +-eps e_k."""
    dim = center.numel()
    opts = {"dtype": center.dtype, "device": center.device}
    if math.isinf(p):
        if 2 ** dim <= limit:
            bits = torch.arange(2 ** dim, device=center.device)[:, None] >> torch.arange(
                dim, device=center.device)
            signs = (bits & 1).to(center.dtype) * 2 - 1
        else:
            signs = torch.randint(0, 2, (limit, dim), generator=gen, device=center.device
                                  ).to(center.dtype) * 2 - 1
        return center + (signs * eps).reshape(-1, *center.shape)
    eye = torch.eye(dim, **opts)
    pts = torch.cat([eye, -eye])[:limit] * eps
    return center + pts.reshape(-1, *center.shape)


def box_vertices(lower: Tensor, upper: Tensor, gen: torch.Generator, limit: int = 1024) -> Tensor:
    mid, half = (lower + upper) / 2, (upper - lower) / 2
    unit = vertices(torch.zeros_like(mid), 1.0, math.inf, gen, limit)
    return mid + unit * half


def ascent_points(model: nn.Module, center: Tensor, eps: float, p: float,
                  objectives: list[tuple[int, int | None, float]], gen: torch.Generator,
                  steps: int = 25, starts: int = 2) -> Tensor:
    """Points found by projected gradient ascent inside the ball, all objectives at once.

    Args:
        objectives: ``(row, column, sign)``: maximise ``sign * J[row, column]`` (column is a
            flat input index), or, with column None, the dual norm of row ``row``.
    Returns:
        ``[len(objectives) * starts, *in]``.
    """
    q = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]
    n = len(objectives) * starts
    rows = torch.tensor([o[0] for o in objectives for _ in range(starts)])
    cols = torch.tensor([o[1] if o[1] is not None else -1 for o in objectives
                         for _ in range(starts)])
    signs = torch.tensor([o[2] for o in objectives for _ in range(starts)], dtype=center.dtype)
    is_norm = cols < 0
    x = random_points(center, eps, p, n, gen)
    step = eps / 4
    for _ in range(steps if eps > 0 else 0):
        x.requires_grad_(True)
        jac = torch.func.vmap(torch.func.jacrev(lambda z: model(z[None])[0]))(x).flatten(2)
        row = jac[torch.arange(n), rows]  # [n, d]
        entry = row.gather(1, cols.clamp(min=0)[:, None])[:, 0] * signs
        value = torch.where(is_norm, row.norm(p=q, dim=1), entry)
        (grad,) = torch.autograd.grad(value.sum(), x, allow_unused=True)
        x = x.detach()
        if grad is None or not torch.isfinite(grad).all():
            break
        g = grad.flatten(1)
        g = g.sign() if math.isinf(p) else g / g.norm(dim=1, keepdim=True).clamp(min=1e-300)
        x = project(x + step * g.reshape(x.shape), center, eps, p)
        step *= 0.85
    return x.detach()


def region_points(model: nn.Module, center: Tensor, eps: float, p: float, n_random: int,
                  gen: torch.Generator, objectives=None) -> Tensor:
    """Random points, vertices and (optionally) ascent points of one ball: ``[N, *in]``."""
    parts = [center[None], random_points(center, eps, p, n_random, gen),
             vertices(center, eps, p, gen)]
    if objectives:
        parts.append(ascent_points(model, center, eps, p, objectives, gen))
    return torch.cat(parts)
