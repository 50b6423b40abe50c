r"""Stages 2 and 3: sound lower bounds of the spec rows over batches of input boxes.

For one unsafe disjunct ``C y <= d`` (``C: [k, m]``, ``d: [k]``) write the rows

    g_i(x) = c_i . f(x) - d_i,      i = 1..k.

The disjunct is **impossible on a box X** when some row has ``min_{x in X} g_i(x) > 0`` (then no
x in X has all rows <= 0).  A row counts as proven when its certified lower bound exceeds
``tol_i = 1e-9 (1 + |d_i| + |lb_i|)`` (float64 bounds, a positive margin for rounding).

**Stage 2 (LiRPA).**  auto_LiRPA bounds ``C f`` on a batch of boxes ``[B, n]`` with C folded in
as its specification matrix ``[B, k, m]``; ``lb(g_i) = lb(c_i . f) - d_i``.

**Stage 3 (Jacobian).**  RecurJac (:class:`rj_plugin.api.JacobianBounder` with the spec C)
gives ``L, U: [B, k, n]`` with ``L_ij <= d g_i / d x_j (x) <= U_ij`` for every x in the box
(Clarke ranges at ReLU kinks).  For any expansion point ``a`` in the box the mean-value
theorem (Lebourg's, for the Lipschitz g) gives

    g_i(x) >= g_i(a) + sum_j min{ s t : s in [L_ij, U_ij], t in [lo_j - a_j, hi_j - a_j] }
           =  g_i(a) + sum_j min(L_ij t^-_j, L_ij t^+_j, U_ij t^-_j, U_ij t^+_j),

with ``t^- = lo - a <= 0 <= t^+ = hi - a``.  Per row, ``a_j`` is the face that minimises a
monotone coordinate (``lo_j`` when ``L_ij >= 0``, ``hi_j`` when ``U_ij <= 0``; the term is then
0: the **monotone collapse** of that row) and the centre otherwise.  ``g_i(a)`` is evaluated in
float64 and lowered by ``1e-9 (1 + |c_i| . |f(a)| + |d_i|)``, far above float64 rounding of these
nets.  The bound kept per row is ``max(LiRPA, mean-value)``.

**Collapse for the disjunct** (:func:`collapse`): when every row of the disjunct is certified
non-decreasing in ``x_j`` over the box, the box may be replaced by its face ``x_j = lo_j``: if
each point x' of the face has a row with ``g_i(x') > 0`` then, for x in the box with the same
other coordinates, ``g_i(x) >= g_i(x') > 0``.  (Non-increasing likewise with ``hi_j``.)  The
face is proven with fewer free inputs; the rows must all agree, since the row that is positive
at x' is not known in advance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rj_plugin.api import JacobianBounder, largest_batch
from rj_plugin.errors import UnsupportedLayerError
from rj_plugin.lirpa import LirpaGraph, make_perturbation
from rj_plugin.verify.network import Network


def proof_tolerance(lb: Tensor, d: Tensor) -> Tensor:
    """``tol = 1e-9 (1 + |d| + |lb|)`` (``[B, k]``): a row is proven when ``lb > tol``."""
    return 1e-9 * (1.0 + d.abs() + lb.abs())


def proven_rows(lb: Tensor, d: Tensor) -> Tensor:
    """``[B, k]`` booleans: certified ``g_i > 0`` on the box (NaN never proves)."""
    return lb > proof_tolerance(lb, d)


@dataclass
class JacobianStep:
    """Stage 3's result on a batch of boxes.

    Attributes:
        lower: ``[B, k]`` mean-value lower bounds of ``g_i`` over each box.
        jac_lo, jac_hi: ``[B, k, n]`` certified bounds of ``d g_i / d x_j``.
        monotone_rows: ``[B, k]`` how many inputs each row collapsed (certified sign).
    """

    lower: Tensor
    jac_lo: Tensor
    jac_hi: Tensor
    monotone_rows: Tensor


class SpecBounder:
    """auto_LiRPA graph and (when the graph allows it) RecurJac bounder, built once.

    Args:
        net: the instance's network.
        jacobian: whether stage 3 is wanted.
        device: torch device.

    Attributes:
        jacobian_skipped: why stage 3 is off (None when it is on).
    """

    def __init__(self, net: Network, jacobian: bool = True, device: str = "cpu") -> None:
        self.net = net
        self.device = torch.device(device)
        self.jb: JacobianBounder | None = None
        self.jacobian_skipped: str | None = None if jacobian else "disabled by options"
        example = torch.zeros(1, *net.input_shape, dtype=torch.float64, device=self.device)
        if jacobian:
            try:
                self.jb = JacobianBounder(net.model, example=example, device=self.device)
            except UnsupportedLayerError as exc:
                self.jacobian_skipped = f"JacobianBounder refused the graph: {exc}"
        self.graph = self.jb.graph if self.jb is not None else LirpaGraph(
            net.model, example, None, self.device)
        self.max_batch = self.jb.max_batch if self.jb is not None else largest_batch(
            self.graph.module, example)

    def _shape(self, flat: Tensor) -> Tensor:
        return flat.reshape(flat.shape[0], *self.net.input_shape)

    def lirpa(self, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor, method: str = "crown",
              alpha_iterations: int = 20) -> Tensor:
        """Stage 2: lower bounds of ``g = C f - d`` over each box: ``lower, upper [B, n]``,
        ``C [k, m]``, ``d [k]`` -> ``[B, k]``."""
        parts = []
        for s in range(0, lower.shape[0], self.max_batch):
            lo, hi = lower[s:s + self.max_batch], upper[s:s + self.max_batch]
            ptb = make_perturbation(math.inf, None, self._shape(lo), self._shape(hi))
            spec = C[None].expand(lo.shape[0], *C.shape)
            lb, _ = self.graph.output_bounds(self._shape((lo + hi) / 2), ptb, spec, method,
                                             alpha_iterations=alpha_iterations)
            parts.append(lb.reshape(lo.shape[0], -1))
        return torch.cat(parts) - d

    def jacobian(self, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor) -> JacobianStep:
        """Stage 3 on a batch of boxes (see the module docstring); requires ``self.jb``."""
        assert self.jb is not None
        B, n = lower.shape
        k = C.shape[0]
        region = self.jb.region(lower=self._shape(lower), upper=self._shape(upper))
        jb = self.jb.bound(region, preact="crown", C=C)
        jlo, jhi = jb.lower.reshape(B, k, n), jb.upper.reshape(B, k, n)
        centre = (lower + upper) / 2
        inc, dec = jlo >= 0, jhi <= 0
        lo3, hi3 = lower[:, None].expand(B, k, n), upper[:, None].expand(B, k, n)
        a = torch.where(inc, lo3, torch.where(dec, hi3, centre[:, None].expand(B, k, n)))
        t_minus, t_plus = lo3 - a, hi3 - a
        terms = torch.minimum(torch.minimum(jlo * t_minus, jlo * t_plus),
                              torch.minimum(jhi * t_minus, jhi * t_plus))
        with torch.no_grad():
            y = self.net(a.reshape(B * k, n)).reshape(B, k, -1)
        g_a = (y * C).sum(-1) - d                      # row i at its own point a^i
        scale = (y.abs() * C.abs()).sum(-1) + d.abs()
        lower_mv = g_a - 1e-9 * (1.0 + scale) + terms.sum(-1)
        return JacobianStep(lower_mv, jlo, jhi, (inc | dec).sum(-1))


def collapse(lower: Tensor, upper: Tensor, jac_lo: Tensor, jac_hi: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Fix inputs that every row of the disjunct is monotone in to the minimising face.

    Args:
        lower, upper: ``[B, n]``; jac_lo, jac_hi: ``[B, k, n]`` over these boxes.

    Returns:
        ``(lower', upper', collapsed [B])``: the faces, and how many inputs of each box were
        newly fixed (inputs already of width 0 are not counted).
    """
    inc = (jac_lo >= 0).all(dim=1)
    dec = (jac_hi <= 0).all(dim=1) & ~inc
    free = upper > lower
    new_upper = torch.where(inc, lower, upper)
    new_lower = torch.where(dec, upper, lower)
    return new_lower, new_upper, ((inc | dec) & free).sum(-1)

