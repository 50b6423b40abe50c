r"""From element-wise Jacobian bounds to Lipschitz constants (spec section 4).

For a region that is an l_p ball (or a box, treated as l_inf), the local Lipschitz constant of
output row j is  sup_x ||J[j, :](x)||_q  with 1/p + 1/q = 1.  With M = max(|L|, |U|) >= |J|:

* p = 1  (q = inf):  max_k M[j, k]
* p = 2  (q = 2):    ||M[j, :]||_2
* p = inf (q = 1):   the l1 merge  UB[J[j,:] s] + sum_{k in S?} M[j, k],  s_k = +1 where L > 0,
  -1 where U < 0 (both strict), 0 on S? (the rest); UB[J[j,:] s] comes from the bound algorithm
  (one more RecurJac chain for the network whose first layer is the single column W_1 s) and is
  capped by sum_{k not in S?} M[j, k], which also bounds it.

Induced norms of the whole Jacobian (``induced_norm_bound``): ||J||_{1->1} <= max column sum of
M, ||J||_{2->2} <= ||M||_2 (since ||J||_2 <= || |J| ||_2 <= ||M||_2, entrywise monotonicity of the
spectral norm on non-negative matrices), ||J||_{inf->inf} <= max_j of the merged row l1 bounds.

The reference "product of operator norms" (``operator_norm_product``) is
||W_m[j, :]||_q  prod_{l<m} ||W_l||_{p->p} max|sigma_l'|.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rj_plugin.errors import InputError

_NORMS = {"1": 1.0, "2": 2.0, "inf": math.inf}


def parse_norm(norm: float | int | str) -> float:
    """``1``, ``2``, ``inf`` (number or string, also ``"linf"``, ``"l2"``) -> 1.0, 2.0 or inf."""
    key = str(norm).lower().removeprefix("l")
    if key in ("infinity", "math.inf", "float('inf')"):
        key = "inf"
    if key.endswith(".0"):
        key = key[:-2]
    if key not in _NORMS:
        raise InputError(f"unknown norm {norm!r}; use 1, 2 or inf")
    return _NORMS[key]


def dual_norm(p: float) -> float:
    """q with 1/p + 1/q = 1 (p in {1, 2, inf})."""
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


def magnitude(lower: Tensor, upper: Tensor) -> Tensor:
    """M = max(|L|, |U|), a bound on |J| entrywise."""
    return torch.maximum(lower.abs(), upper.abs())


def fixed_signs(lower: Tensor, upper: Tensor) -> Tensor:
    """+1 where L > 0, -1 where U < 0, 0 elsewhere (the strict tests of the l1 merge)."""
    return (lower > 0).to(lower.dtype) - (upper < 0).to(lower.dtype)


def abs_chord(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Slopes s and summed intercepts of the chords of |J_k| over [L_k, U_k]:
    ``sum_k |J_k| <= J . s + offset`` for every J in the box.

    s_k = (U + L) / (U - L), c_k = -2 U L / (U - L) where L < 0 < U; s_k = sign(J_k), c_k = 0
    where the sign is certified (including L = U = 0).  Shapes ``[B, c, n]`` -> ``[B, c, n]``,
    ``[B, c]``.
    """
    free = (lower < 0) & (upper > 0)
    width = torch.where(free, upper - lower, torch.ones_like(lower))
    slope = torch.where(free, (upper + lower) / width, fixed_signs(lower, upper))
    offset = torch.where(free, -2 * upper * lower / width, torch.zeros_like(lower))
    return slope, offset.sum(-1)


def square_chord(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_k J_k^2 <= J . (L + U) - sum_k L_k U_k`` for every J in the box [L, U] (since
    (J_k - L_k)(J_k - U_k) <= 0): the weights ``[B, c, n]`` and the offset ``[B, c]``."""
    return lower + upper, -(lower * upper).sum(-1)


def row_lipschitz(lower: Tensor, upper: Tensor, p: float,
                  merged_upper: Tensor | None = None) -> Tensor:
    """Bound on the dual norm of every Jacobian row over an l_p region.

    Args:
        lower, upper: ``[B, c, n]`` element-wise bounds (input flattened).
        p: the region's norm.
        merged_upper: for p = inf, ``[B, c]`` upper bounds of ``J[j,:] . s_j`` with
            ``s = fixed_signs(lower, upper)``; without it the plain sum of M is used.

    Returns:
        ``[B, c]``.
    """
    mag = magnitude(lower, upper)
    if p == 1.0:
        return mag.amax(-1)
    if p == 2.0:
        return mag.square().sum(-1).sqrt()
    signs = fixed_signs(lower, upper)
    free = (mag * (signs == 0)).sum(-1)
    fixed = (mag * (signs != 0)).sum(-1)
    if merged_upper is None:
        return free + fixed
    return free + torch.minimum(merged_upper.clamp(min=0), fixed)


def induced_norm_bound(lower: Tensor, upper: Tensor, p: float,
                       row_bounds: Tensor | None = None) -> Tensor:
    """Bound on the induced p->p norm of the Jacobian over the region, ``[B]``.

    ``row_bounds`` (``[B, c]``, from :func:`row_lipschitz` with p = inf) refines the inf->inf case.
    """
    mag = magnitude(lower, upper)
    if p == 1.0:
        return mag.sum(-2).amax(-1)
    if p == 2.0:
        return torch.linalg.matrix_norm(mag, ord=2)
    if row_bounds is None:
        row_bounds = mag.sum(-1)
    return row_bounds.amax(-1)


def matrix_operator_norm(weight: Tensor, p: float) -> Tensor:
    """||W||_{p->p}: max column abs-sum (p=1), spectral norm (p=2), max row abs-sum (p=inf)."""
    if p == 1.0:
        return weight.abs().sum(-2).amax(-1)
    if p == 2.0:
        return torch.linalg.matrix_norm(weight, ord=2)
    return weight.abs().sum(-1).amax(-1)


def operator_norm_product(net, max_derivatives: list[float], p: float) -> Tensor:
    """Naive global Lipschitz bound per output row (spec section 5b), ``[c]`` or ``[B, c]``.

    On a chain: ``||W_m[j,:]||_q * prod_{l<m} ||W_l||_{p->p} * max|sigma_l'|``.  On a DAG
    (``net``: a :class:`rj_plugin.recurjac.JacobianDAG`) the same product summed over paths,
    by the triangle inequality on  D_s = A_{m<-s} + sum_t D_t S_t A_{t<-s}:
    ``N_s = ||A_{m<-s}[j,:]||_q + sum_t N_t max|sigma_t'| ||A_{t<-s}||_{p->p}``,  result N_0.
    """
    q = dual_norm(p)
    m = net.depth
    norms: dict[int, Tensor] = {}
    for s in range(m - 1, -1, -1):
        total = None
        for t in net.successors[s]:
            a = net.edges[(s, t)]
            if t == m:
                term = torch.linalg.vector_norm(a, ord=q, dim=-1)
            else:
                term = norms[t] * matrix_operator_norm(a, p) * max_derivatives[t - 1]
            total = term if total is None else total + term
        norms[s] = total if total is not None else torch.zeros(())
    return norms[0]
