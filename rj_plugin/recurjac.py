r"""Element-wise Jacobian bounds of a layered network: RecurJac, Fast-Lip and plain intervals.

The network's Jacobian is a product (spec section 1)

    J(x) = W_m  S_{m-1}(x)  W_{m-1}  ...  S_1(x)  W_1,      S_k(x) = diag(sigma_k'(z_k(x)))

with ``W_k`` of shape ``[n_k, n_{k-1}]`` (n_0 = input size, n_m = number of output rows, any
specification matrix C already folded into W_m) and certified derivative ranges
``g_lo[k] <= sigma_k' <= g_hi[k]`` over the input region, one pair per input of the batch.

Backward partial products  Y_l := dF/dh_{l-1} = W_m S_{m-1} ... S_l W_l  (shape ``[c, n_{l-1}]``)
satisfy Y_m = W_m and Y_l = Y_{l+1} S_l W_l; J = Y_1.  All three algorithms bound Y_l for
l = m, m-1, ..., 1 in that order, each level from the bounds of the levels above.

RecurJac (spec section 3)
-------------------------
The central quantity is, for a vector w over the neurons of hidden layer t and an output row j,

    RB_up(w, t, j) >= Y_{t+1}[j, :] S_t w     for every x in the region.

Split the neurons r of layer t with the bounds [L, U] of Y_{t+1}[j, r]:

* known sign (U <= 0 or L >= 0), or exactly known derivative (g_lo == g_hi): the sign of each
  term Y_{t+1}[j, r] sigma'_r w_r is known, so  sigma'_r <= s_r := (g_hi if Y w >= 0 else g_lo)
  bounds the term and the sum over these r is at most  Y_{t+1}[j, :] v  with v_r = s_r w_r
  (0 elsewhere).  Since Y_{t+1} = Y_{t+2} S_{t+1} W_{t+1}, that is  Y_{t+2}[j,:] S_{t+1} (W_{t+1} v),
  bounded by RB_up(W_{t+1} v, t+1, j): the folded vector is pushed through the real deeper
  layers, which keeps the correlation between the entries of the row;
* the rest (unknown sign and uncertain derivative) gets the exact range of a product of
  independent intervals  Y in [L, U], sigma' in [g_lo, g_hi] times w_r.

At t = m-1, Y_m = W_m is exact, every neuron is folded and the chain ends with the dot product
W_m[j, :] v.  The recursion is therefore one *chain* per (row, vector): a loop over t with one
fold and one matrix product per level.  The level-l bounds are

    upper Y_l[j, k] = RB_up(W_l[:, k], l, j),      lower Y_l[j, k] = -RB_up(-W_l[:, k], l, j),

the lower bound by the mirror identity  min_x a(x).w = -max_x a(x).(-w),  which maps every step
of the lower chain (spec's RB_lo) onto a step of the upper chain with the negated vector; the two
chains never mix.  All (batch, row, column, upper/lower) chains of one level run together as one
tensor ``[B, c, K, n_t]``: the fold is elementwise, and the push through W_{t+1} one matmul.

Soundness needs only z_t(x) in [l_t, u_t] and Y_t(x) in [L_t, U_t] pointwise for x in the
region; nothing assumes the sigma' are independent or non-negative (the interval products use all
four corners), so signed derivative ranges are handled soundly too.

Fast-Lip (``fastlip``): Y_l = [Y_{l+1}] [S_l] W_l in interval arithmetic, each entry of the row
an independent interval.  The first step from the exact Y_m is exact, as in RecurJac.
Plain intervals (``interval``): the same interval product evaluated from the input side,
Z_1 = W_1,  Z_{k+1} = W_{k+1} [S_k] [Z_k],  J in Z_m.

With ``intersect=True`` (the default) RecurJac also computes the Fast-Lip step from the level
above and keeps the intersection of the two (both are sound, so is their intersection); deeper
levels then classify neurons with the tighter row bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Elements of the largest [B, c, K, n] working tensor; a handful of these exist at a time.
DEFAULT_MAX_ELEMENTS = 1 << 19


@dataclass
class LayeredJacobian:
    """The factors of J(x) = W_m S_{m-1} W_{m-1} ... S_1 W_1 with derivative ranges.

    Attributes:
        weights: ``[W_1, ..., W_m]``, ``W_k`` of shape ``[n_k, n_{k-1}]``, shared by the batch;
            the last may also be ``[B, c, n_{m-1}]`` (one specification per input, e.g. margins
            against each input's own label).
        g_lo, g_hi: ``m - 1`` tensors ``[B, n_k]``: certified ranges of sigma_k'(z_k(x)).
    """

    weights: list[Tensor]
    g_lo: list[Tensor]
    g_hi: list[Tensor]

    def __post_init__(self) -> None:
        m = len(self.weights)
        if m == 0:
            raise ValueError("a layered Jacobian needs at least one linear map")
        if len(self.g_lo) != m - 1 or len(self.g_hi) != m - 1:
            raise ValueError(f"{m} linear maps need {m - 1} derivative ranges, got "
                             f"{len(self.g_lo)} / {len(self.g_hi)}")
        for k in range(1, m):
            if self.weights[k].shape[-1] != self.weights[k - 1].shape[-2]:
                raise ValueError(f"W_{k + 1} {tuple(self.weights[k].shape)} does not follow "
                                 f"W_{k} {tuple(self.weights[k - 1].shape)}")
            n_k = self.weights[k - 1].shape[-2]
            if self.g_lo[k - 1].shape[-1] != n_k or self.g_hi[k - 1].shape[-1] != n_k:
                raise ValueError(f"derivative range {k} has {self.g_lo[k - 1].shape[-1]} "
                                 f"neurons, layer has {n_k}")

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def batch(self) -> int:
        if self.g_lo:
            return self.g_lo[0].shape[0]
        return self.weights[-1].shape[0] if self.weights[-1].dim() == 3 else 1

    @property
    def n_out(self) -> int:
        return self.weights[-1].shape[-2]

    @property
    def n_in(self) -> int:
        return self.weights[0].shape[-1]

    def with_last(self, last: Tensor) -> LayeredJacobian:
        """The same network with W_m replaced (e.g. by C @ W_m for a specification C)."""
        return LayeredJacobian(self.weights[:-1] + [last], self.g_lo, self.g_hi)


@dataclass
class BackwardBounds:
    """Bounds on every backward partial product: ``lower[l], upper[l]`` bound Y_l, ``[B, c, n_{l-1}]``.

    Index l runs 1..m (entry 0 is unused) so the code reads like the math; ``lower[1]`` bounds J.
    """

    lower: list[Tensor | None]
    upper: list[Tensor | None]


# ----------------------------------------------------------------------------------------------
# interval helpers


def _interval_mul(a_lo: Tensor, a_hi: Tensor, b_lo: Tensor, b_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Exact range of a*b for independent a in [a_lo, a_hi], b in [b_lo, b_hi] (broadcasting)."""
    c1, c2, c3, c4 = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    return (torch.minimum(torch.minimum(c1, c2), torch.minimum(c3, c4)),
            torch.maximum(torch.maximum(c1, c2), torch.maximum(c3, c4)))


def _interval_matmul(lo: Tensor, hi: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Range of X @ W for X in [lo, hi] (``[..., n]``) and exact W (``[n, k]``): ``[..., k]``."""
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    return lo @ w_pos + hi @ w_neg, hi @ w_pos + lo @ w_neg


def _fastlip_step(net: LayeredJacobian, y_lo: Tensor, y_hi: Tensor, level: int
                  ) -> tuple[Tensor, Tensor]:
    """Bounds of Y_level = Y_{level+1} S_level W_level from interval bounds of Y_{level+1}.

    ``y_lo, y_hi``: ``[B, c, n_level]``; returns ``[B, c, n_{level-1}]``.
    """
    g_lo = net.g_lo[level - 1][:, None, :]
    g_hi = net.g_hi[level - 1][:, None, :]
    t_lo, t_hi = _interval_mul(y_lo, y_hi, g_lo, g_hi)
    return _interval_matmul(t_lo, t_hi, net.weights[level - 1])


# ----------------------------------------------------------------------------------------------
# RecurJac


def _chain_coefficients(net: LayeredJacobian, bounds: BackwardBounds, t: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-(row, neuron) coefficients of one RecurJac step at hidden layer t, ``[B, c, 1, n_t]``.

    With [L, U] the bounds of Y_{t+1}[j, r] and [g_lo, g_hi] those of sigma_t'(z_r), one step maps
    a vector w (over layer t) to a worst-case sum and a folded vector v:

        worst_j = sum_r (w_r > 0 ? worst_pos : worst_neg)[j, r] * w_r
        v_jr    = (w_r > 0 ? fold_pos : fold_neg)[j, r] * w_r

    *Folded* neurons (U <= 0, or L >= 0, or g_lo == g_hi) get the maximising derivative
    (g_hi when Y w >= 0, else g_lo) in ``fold_*`` and 0 in ``worst_*``; the others get 0 in
    ``fold_*`` and  max over the corners of [L, U] x [g_lo, g_hi] of  Y sigma'  (for w > 0) or
    min (for w < 0) in ``worst_*``.
    """
    y_lo = bounds.lower[t + 1][:, :, None, :]  # [B, c, 1, n_t]
    y_hi = bounds.upper[t + 1][:, :, None, :]
    g_lo = net.g_lo[t - 1][:, None, None, :]  # [B, 1, 1, n_t]
    g_hi = net.g_hi[t - 1][:, None, None, :]
    nonpos = y_hi <= 0
    folded = nonpos | (y_lo >= 0) | (g_lo == g_hi)
    zero = torch.zeros((), dtype=y_lo.dtype, device=y_lo.device)
    fold_pos = torch.where(folded, torch.where(nonpos, g_lo, g_hi), zero)
    fold_neg = torch.where(folded, torch.where(nonpos, g_hi, g_lo), zero)
    prod_lo, prod_hi = _interval_mul(y_lo, y_hi, g_lo, g_hi)
    worst_pos = torch.where(folded, zero, prod_hi)
    worst_neg = torch.where(folded, zero, prod_lo)
    return fold_pos, fold_neg, worst_pos, worst_neg


def upper_chain(net: LayeredJacobian, bounds: BackwardBounds, w: Tensor, level: int) -> Tensor:
    """RB_up(w, t=level, j) for a batch of vectors: an upper bound of Y_{t+1}[j,:] S_t w.

    Args:
        net: the layered Jacobian.
        bounds: bounds of Y_{t+1}, ..., Y_m (filled for every level above ``level``).
        w: ``[B, c, K, n_t]`` vectors over the neurons of hidden layer t = ``level``; row j of
            dimension 1 is the output row the bound is for; K independent vectors per row.
        level: the hidden layer t in 1..m-1.

    Returns:
        ``[B, c, K]`` upper bounds, valid for every x in the region.
    """
    m = net.depth
    acc = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    for t in range(level, m):
        fold_pos, fold_neg, worst_pos, worst_neg = _chain_coefficients(net, bounds, t)
        # With w+ = max(w, 0):  (w > 0 ? a : b) * w  =  b * w + (a - b) * w+,
        # so both the worst-case sum and the folded vector cost a few passes over w.
        w_pos = w.clamp(min=0)
        # Unknown sign and uncertain derivative: worst case of the product of intervals.
        acc += _rowdot(w, worst_neg) + _rowdot(w_pos, worst_pos - worst_neg)
        # Known sign or exact derivative: fold with the maximising derivative.
        v = (w * fold_neg).addcmul_(w_pos, fold_pos - fold_neg)
        del w_pos
        if t == m - 1:  # Y_m = W_m exactly: the chain ends with a dot product
            acc += _rowdot(v, bounds.upper[m][:, :, None, :])
        else:
            w = v @ net.weights[t].T  # [B, c, K, n_{t+1}]
    return acc


def _rowdot(x: Tensor, coef: Tensor) -> Tensor:
    """``(x * coef).sum(-1)`` for x ``[B, c, K, n]`` and coef ``[B|1, c, 1, n]`` as a batched
    matrix-vector product (no ``[B, c, K, n]`` temporary): ``[B, c, K]``."""
    return (x @ coef.transpose(-1, -2)).squeeze(-1)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def recurjac_backward(net: LayeredJacobian, *, intersect: bool = True,
                      max_elements: int = DEFAULT_MAX_ELEMENTS) -> BackwardBounds:
    """RecurJac bounds of every backward partial product Y_m, ..., Y_1 (spec section 3).

    Returns bounds with ``lower[1], upper[1]`` of shape ``[B, c, n_0]`` bounding J.
    """
    m, batch, c = net.depth, net.batch, net.n_out
    lower: list[Tensor | None] = [None] * (m + 1)
    upper: list[Tensor | None] = [None] * (m + 1)
    last = net.weights[-1].expand(batch, *net.weights[-1].shape[-2:])
    lower[m], upper[m] = last, last
    bounds = BackwardBounds(lower, upper)
    for level in range(m - 1, 0, -1):
        weight = net.weights[level - 1]  # W_level: [n_level, n_{level-1}]
        n_cols = weight.shape[1]
        widest = max(w.shape[-2] for w in net.weights[level - 1:-1])
        per_col = max(1, batch * c * 2 * widest)
        lo = torch.empty(batch, c, n_cols, dtype=weight.dtype, device=weight.device)
        hi = torch.empty_like(lo)
        for cols in _chunks(n_cols, max(1, max_elements // per_col)):
            w = weight[:, cols].T  # [K, n_level]
            w = torch.cat([w, -w], 0).expand(batch, c, -1, -1)  # upper chain, mirrored lower
            out = upper_chain(net, bounds, w, level)
            k = cols.stop - cols.start
            hi[:, :, cols] = out[..., :k]
            lo[:, :, cols] = -out[..., k:]
        if intersect:
            f_lo, f_hi = _fastlip_step(net, lower[level + 1], upper[level + 1], level)
            lo, hi = torch.maximum(lo, f_lo), torch.minimum(hi, f_hi)
        lower[level], upper[level] = lo, hi
    return bounds


def fastlip_backward(net: LayeredJacobian) -> BackwardBounds:
    """Fast-Lip: interval products from the output side, Y_l = [Y_{l+1}] [S_l] W_l."""
    m, batch = net.depth, net.batch
    lower: list[Tensor | None] = [None] * (m + 1)
    upper: list[Tensor | None] = [None] * (m + 1)
    last = net.weights[-1].expand(batch, *net.weights[-1].shape[-2:])
    lower[m], upper[m] = last, last
    for level in range(m - 1, 0, -1):
        lower[level], upper[level] = _fastlip_step(net, lower[level + 1], upper[level + 1], level)
    return BackwardBounds(lower, upper)


def interval_forward(net: LayeredJacobian) -> tuple[Tensor, Tensor]:
    """Plain interval product from the input side: Z_{k+1} = W_{k+1} [S_k] [Z_k]; ``[B, c, n_0]``."""
    batch = net.batch
    z = net.weights[0].expand(batch, *net.weights[0].shape[-2:])  # [B, n_1, n_0]
    z_lo, z_hi = z, z
    for k in range(1, net.depth):
        g_lo = net.g_lo[k - 1][:, :, None]
        g_hi = net.g_hi[k - 1][:, :, None]
        t_lo, t_hi = _interval_mul(z_lo, z_hi, g_lo, g_hi)  # [B, n_k, n_0]
        weight = net.weights[k]
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        z_lo, z_hi = w_pos @ t_lo + w_neg @ t_hi, w_pos @ t_hi + w_neg @ t_lo
    return z_lo, z_hi


def merged_row_upper(net: LayeredJacobian, bounds: BackwardBounds, signs: Tensor,
                     method: str) -> Tensor:
    """Upper bound of  J[j, :] . s_j  for one sign vector per row (the l1 merge, spec section 4).

    ``J[j,:] s_j = Y_2[j,:] S_1 (W_1 s_j)`` is the Jacobian row of the network whose first layer
    is the single column W_1 s_j.  RecurJac bounds it with one chain; Fast-Lip with one interval
    step; both are exact when the network has no hidden layer.

    Args:
        signs: ``[B, c, n_0]`` with entries in {-1, 0, +1}.

    Returns:
        ``[B, c]`` upper bounds.
    """
    if net.depth == 1:  # J = W_1 exactly
        return (signs * net.weights[0]).sum(-1)
    merged = signs @ net.weights[0].T  # [B, c, n_1]
    if method == "recurjac":
        return upper_chain(net, bounds, merged[:, :, None, :], 1)[..., 0]
    g_lo, g_hi = net.g_lo[0][:, None, :], net.g_hi[0][:, None, :]
    t_lo, t_hi = _interval_mul(bounds.lower[2], bounds.upper[2], g_lo, g_hi)
    return torch.maximum(t_lo * merged, t_hi * merged).sum(-1)
