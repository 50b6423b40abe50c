r"""Element-wise Jacobian bounds: RecurJac, Fast-Lip and plain intervals, on chains and DAGs.

Network form
------------
Nodes 0 (the input x = h_0), 1..m-1 (elementwise activations h_t = sigma_t(z_t), in topological
order) and m (the output f).  An edge (s, t), s < t, is the linear part A_{t<-s} of the affine
sub-graph leading from h_s to z_t (or to f when t = m), shape ``[n_t, n_s]``:

    z_t = sum_{s < t} A_{t<-s} h_s + b_t,        f = sum_{s < m} A_{m<-s} h_s + b_m.

A plain MLP is the chain of edges (t-1, t) with A_{t<-t-1} = W_t (spec section 1); a residual
block y = x + g(x) adds an edge that skips activations.  With S_t = diag(sigma_t'(z_t(x))), the
backward partials D_s := df/dh_s (``[c, n_s]``) satisfy the reverse-mode recursion

    D_s = A_{m<-s} + sum_{s < t < m} D_t S_t A_{t<-s},          J = df/dx = D_0,

a sum over all paths from h_s to f.  Certified ranges g_lo[t] <= sigma_t' <= g_hi[t] over the
input region (one per input of the batch) come from the pre-activation bounds.  All algorithms
bound D_{m-1}, ..., D_1, D_0 in that order, each from the bounds of its descendants.

RecurJac (spec section 3), generalised to DAGs
---------------------------------------------
For an activation node t, a row j and a vector w over its neurons, the quantity to bound is
Q_j(w, t) := D_t[j, :] S_t w (the directional derivative of f_j along w at z_t); it is *linear in
w* for every fixed x.  Split the neurons r of node t with the bounds [L, U] of D_t[j, r]:

* known sign (U <= 0 or L >= 0), or exactly known derivative (g_lo == g_hi): the term
  D_t[j,r] sigma'_r w_r has a known sign, so sigma'_r <= s_r := (g_hi if D w >= 0 else g_lo)
  bounds it; these terms sum to at most D_t[j, :] v with v_r = s_r w_r (0 elsewhere), and by the
  recursion above  D_t[j,:] v = A_{m<-t}[j,:] v + sum_u Q_j(A_{u<-t} v, u);
* the other neurons get the exact range of a product of independent intervals D in [L, U],
  sigma' in [g_lo, g_hi], times w_r (all four corners: signed derivative ranges are sound too).

Because Q_j(., u) is linear, the contributions that several predecessors push into the same node
u add up to *one* vector before u is processed: Q_j(w1, u) + Q_j(w2, u) = Q_j(w1 + w2, u), and
bounding the sum at once is sound and no looser than bounding the parts.  One bound is therefore a
single sweep over the activation nodes in topological order, each with one fold and one matrix
product per outgoing edge; on a chain this is exactly the spec's chain RB_up (the last two layers
exact, since D_{m-1} = A_{m<-m-1} is known exactly).  The bounds of D_s are

    upper D_s[j, k] = A_{m<-s}[j, k] + sweep(w_t = A_{t<-s}[:, k] for all t),
    lower D_s[j, k] = A_{m<-s}[j, k] - sweep(w_t = -A_{t<-s}[:, k]),

the lower one by the mirror identity  min_x a(x).w = -max_x a(x).(-w),  which turns every step of
the spec's lower chain into a step of the upper chain with the negated vector; the two chains
never mix.  All (batch, row, column, upper/lower) sweeps of one node run together in tensors
``[B, c, K, n_t]``.  Soundness needs only z_t(x) in [l_t, u_t] and D_t(x) in [L_t, U_t]
pointwise for x in the region; nothing assumes the sigma' are independent or non-negative.

Linear (``linear``, :func:`recurjac_backward` with ``linear=True``): the same sweep, but a neuron
whose D has no certified sign contributes the chord of max(g_lo D, g_hi D) over [L, U] (its slope
folded, its intercept a constant) instead of a constant; with ``net.linked`` (smooth activations)
also a sweep that bounds each product D sigma'(z) by a McCormick plane and ties sigma' to the input
through lines in z and CROWN's lines of z in x (:func:`linked_upper_sweep`).  Every node takes
the smallest of the sweeps.

Fast-Lip (``fastlip``): D_s = A_{m<-s} + sum_t [D_t] [S_t] A_{t<-s} in interval arithmetic.
Plain intervals (``interval``): the same products from the input side, Z_t := dz_t/dx,
Z_t = sum_s A_{t<-s} [S_s] [Z_s] (with S_0 Z_0 = I), J in sum_s A_{m<-s} [S_s] [Z_s].

With ``intersect=True`` (the default) RecurJac also takes the Fast-Lip step from the bounds of the
descendants and keeps the intersection (both are sound); deeper levels then classify neurons with
the tighter bounds.  For graphs given by dense matrices it finally intersects J's bounds with the
forward interval product as well: the two directions are exact at opposite ends (the forward
product at the input layer, the backward ones at the output layer), so on nets whose first
hidden layer has the more certain derivatives (few inputs, or trained tanh nets) the forward
product can be tighter.  It costs about a fifth of RecurJac's time on the 784-1024-1024-10
reference; for structured graphs (``push`` given, e.g. CNNs) its dense products would dominate
and it is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Elements of the largest [B, c, K, n] working tensor; a handful of these exist at a time.  Small
# chunks keep the elementwise passes in cache (measured: 4x faster than one large chunk).
DEFAULT_MAX_ELEMENTS = 1 << 19

Edge = tuple[int, int]

# Elements of the per-entry input lines of :func:`input_lines` ([B, c, n_0, n_0] twice) allowed
# (2 GiB in float64); beyond, the operator falls back to constant bounds.
MAX_LINE_ELEMENTS = 1 << 28


@dataclass
class JacobianDAG:
    """Linear maps between activation nodes and certified derivative ranges.

    Attributes:
        edges: ``(s, t) -> A_{t<-s}`` of shape ``[n_t, n_s]`` (0 <= s < t <= m); the edges into
            the output m may also be ``[B, c, n_s]`` (one specification per input, e.g. margins
            against each input's own label).
        g_lo, g_hi: ``m - 1`` tensors ``[B, n_t]``: ranges of sigma_t'(z_t(x)), t = 1..m-1.
        push: optional structured application of the edges out of a node,
            ``push(s, v [R, n_s]) -> {t: v @ A_{t<-s}^T [R, n_t]}`` (e.g. convolutions instead of
            their dense matrices); RecurJac's sweeps use it for the edges between activations.
        linked: optional linear bounds of the derivatives in the input (smooth activations),
            used by the ``linear`` method's sweep (see :class:`LinkedPreactivations`).
    """

    edges: dict[Edge, Tensor]
    g_lo: list[Tensor]
    g_hi: list[Tensor]
    push: Callable[[int, Tensor], dict[int, Tensor]] | None = None
    linked: LinkedPreactivations | None = None

    def __post_init__(self) -> None:
        m = self.depth
        if len(self.g_hi) != m - 1:
            raise ValueError("g_lo and g_hi differ in length")
        if not any(t == m for _, t in self.edges):
            raise ValueError("no edge reaches the output")
        sizes: dict[int, int] = {t: g.shape[-1] for t, g in enumerate(self.g_lo, start=1)}
        for (s, t), a in self.edges.items():
            if not 0 <= s < t <= m:
                raise ValueError(f"edge {(s, t)} does not go forward between nodes 0..{m}")
            for node, n in ((s, a.shape[-1]), (t, a.shape[-2])):
                if sizes.setdefault(node, n) != n:
                    raise ValueError(f"edge {(s, t)} of shape {tuple(a.shape)} does not match "
                                     f"node {node} of size {sizes[node]}")
        self.sizes = sizes
        self.successors: dict[int, list[int]] = {
            s: sorted(t for (s2, t) in self.edges if s2 == s) for s in range(m)}

    @classmethod
    def chain(cls, weights: list[Tensor], g_lo: list[Tensor], g_hi: list[Tensor]
              ) -> JacobianDAG:
        """The MLP form J = W_m S_{m-1} W_{m-1} ... S_1 W_1 (``weights[k-1] = W_k``)."""
        return cls({(k, k + 1): w for k, w in enumerate(weights)}, g_lo, g_hi)

    @property
    def depth(self) -> int:
        """m: the output's node index (activation layers + 1)."""
        return len(self.g_lo) + 1

    @property
    def batch(self) -> int:
        if self.g_lo:
            return self.g_lo[0].shape[0]
        return max((a.shape[0] for a in self.edges.values() if a.dim() == 3), default=1)

    @property
    def n_out(self) -> int:
        return self.sizes[self.depth]

    @property
    def n_in(self) -> int:
        return self.sizes[0]

    def output_edges(self) -> dict[int, Tensor]:
        """``s -> A_{m<-s}`` broadcast to ``[B, c, n_s]``."""
        m, batch = self.depth, self.batch
        return {s: a.expand(batch, *a.shape[-2:]) for (s, t), a in self.edges.items() if t == m}

    def with_spec(self, C: Tensor) -> JacobianDAG:
        """The network C f (``C``: ``[k, c]`` or ``[B, k, c]``), C folded into the output edges."""
        m = self.depth
        edges = {e: (C @ a if e[1] == m else a) for e, a in self.edges.items()}
        return JacobianDAG(edges, self.g_lo, self.g_hi, self.push, self.linked)

    def push_from(self, s: int, v: Tensor) -> dict[int, Tensor]:
        """``{t: v @ A_{t<-s}^T}`` for the activation successors t of s; v ``[..., n_s]``."""
        targets = [t for t in self.successors[s] if t < self.depth]
        if self.push is None or not targets:
            return {t: v @ self.edges[(s, t)].T for t in targets}
        lead = v.shape[:-1]
        pushed = self.push(s, v.reshape(-1, v.shape[-1]))
        return {t: pushed[t].reshape(*lead, -1) for t in targets}


@dataclass
class BackwardBounds:
    """``lower[s], upper[s]``: bounds of D_s = df/dh_s, ``[B, c, n_s]``; ``s = 0`` bounds J.
    ``reference``: RecurJac's own bounds, computed alongside by the ``linear`` method."""

    lower: list[Tensor | None]
    upper: list[Tensor | None]
    reference: BackwardBounds | None = None


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


def _fastlip_step(net: JacobianDAG, bounds: BackwardBounds, s: int) -> tuple[Tensor, Tensor]:
    """Interval bounds of D_s = A_{m<-s} + sum_t [D_t] [S_t] A_{t<-s}: ``[B, c, n_s]`` each."""
    m = net.depth
    const = net.output_edges().get(s)
    lo = hi = const if const is not None else 0.0
    for t in net.successors[s]:
        if t == m:
            continue
        g_lo, g_hi = net.g_lo[t - 1][:, None, :], net.g_hi[t - 1][:, None, :]
        t_lo, t_hi = _interval_mul(bounds.lower[t], bounds.upper[t], g_lo, g_hi)
        step_lo, step_hi = _interval_matmul(t_lo, t_hi, net.edges[(s, t)])
        lo, hi = lo + step_lo, hi + step_hi
    if isinstance(lo, float):  # h_s does not reach the output
        zero = torch.zeros(net.batch, net.n_out, net.sizes[s], dtype=net.g_lo[0].dtype,
                           device=net.g_lo[0].device)
        return zero, zero
    return lo.expand(net.batch, net.n_out, net.sizes[s]), hi.expand(
        net.batch, net.n_out, net.sizes[s])


# ----------------------------------------------------------------------------------------------
# RecurJac


def _sweep_coefficients(net: JacobianDAG, bounds: BackwardBounds, t: int, linear: bool = False
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-(row, neuron) coefficients of the step at activation node t, ``[B, c, 1, n_t]``.

    With [L, U] the bounds of D_t[j, r] and [g_lo, g_hi] those of sigma_t'(z_r), the step maps a
    vector w over node t to a worst-case sum and a folded vector v:

        worst_j = sum_r (w_r > 0 ? worst_pos : worst_neg)[j, r] * w_r
        v_jr    = (w_r > 0 ? fold_pos : fold_neg)[j, r] * w_r

    *Folded* neurons (U <= 0, or L >= 0, or g_lo == g_hi) get the maximising derivative
    (g_hi when D w >= 0, else g_lo) in ``fold_*`` and 0 in ``worst_*``.  For the others:

    * ``linear=False`` (RecurJac): 0 in ``fold_*`` and the max (w > 0) or min (w < 0) over the
      corners of [L, U] x [g_lo, g_hi] of D sigma' in ``worst_*`` (a constant);
    * ``linear=True`` (the chord relaxation): with a = g_lo <= b = g_hi and L < 0 < U,
      max_{sigma' in [a, b]} sigma' D = max(a D, b D) =: phi(D) is convex in D, so on [L, U] it
      lies below its chord  phi(D) <= k_+ D + (a - k_+) L,  k_+ = (b U - a L) / (U - L);
      min(a D, b D) =: psi(D) is concave and lies above its chord
      psi(D) >= k_- D + (b - k_-) L,  k_- = (a U - b L) / (U - L).  So for w > 0 the term
      D sigma' w is at most w (k_+ D + (a - k_+) L), and for w < 0 at most w (k_- D + (b - k_-) L):
      the slope k goes into ``fold_*`` (D stays a linear function, bounded downstream together
      with the other neurons) and the intercept into ``worst_*``.  On the folded neurons phi and
      psi are linear and the chord is the fold above, so the two rules agree there.
    """
    d_lo = bounds.lower[t][:, :, None, :]  # [B, c, 1, n_t]
    d_hi = bounds.upper[t][:, :, None, :]
    g_lo = net.g_lo[t - 1][:, None, None, :]  # [B, 1, 1, n_t]
    g_hi = net.g_hi[t - 1][:, None, None, :]
    nonpos = d_hi <= 0
    folded = nonpos | (d_lo >= 0) | (g_lo == g_hi)
    zero = torch.zeros((), dtype=d_lo.dtype, device=d_lo.device)
    fold_pos = torch.where(folded, torch.where(nonpos, g_lo, g_hi), zero)
    fold_neg = torch.where(folded, torch.where(nonpos, g_hi, g_lo), zero)
    if linear:
        width = torch.where(folded, torch.ones((), dtype=d_lo.dtype, device=d_lo.device),
                            d_hi - d_lo)
        slope_pos = (g_hi * d_hi - g_lo * d_lo) / width
        slope_neg = (g_lo * d_hi - g_hi * d_lo) / width
        return (torch.where(folded, fold_pos, slope_pos),
                torch.where(folded, fold_neg, slope_neg),
                torch.where(folded, zero, (g_lo - slope_pos) * d_lo),
                torch.where(folded, zero, (g_hi - slope_neg) * d_lo))
    prod_lo, prod_hi = _interval_mul(d_lo, d_hi, g_lo, g_hi)
    return fold_pos, fold_neg, torch.where(folded, zero, prod_hi), torch.where(folded, zero,
                                                                               prod_lo)


def _rowdot(x: Tensor, coef: Tensor) -> Tensor:
    """``(x * coef).sum(-1)`` for x ``[B, c, K, n]`` and coef ``[B|1, c, 1, n]`` as a batched
    matrix-vector product (no ``[B, c, K, n]`` temporary): ``[B, c, K]``."""
    return (x @ coef.transpose(-1, -2)).squeeze(-1)


def upper_sweep(net: JacobianDAG, bounds: BackwardBounds, pending: dict[int, Tensor],
                linear: bool = False) -> Tensor:
    """Upper bound of  sum_t Q_j(w_t, t)  for vectors ``pending[t]`` ``[B, c, K, n_t]``.

    Row j of dimension 1 is the output row each bound is for; K independent problems per row.
    ``bounds`` must hold D_t for every node t the sweep reaches.  Returns ``[B, c, K]``.
    ``pending`` is consumed.  ``linear`` picks the chord relaxation of the neurons whose
    partial derivative has no certified sign (see :func:`_sweep_coefficients`).
    """
    m = net.depth
    acc = None
    out_edges = net.output_edges()
    for t in range(min(pending), m):
        w = pending.pop(t, None)
        if w is None:
            continue
        fold_pos, fold_neg, worst_pos, worst_neg = _sweep_coefficients(net, bounds, t, linear)
        # With w+ = max(w, 0):  (w > 0 ? a : b) * w  =  b * w + (a - b) * w+,
        # so the worst-case sum and the folded vector cost a few passes over w.
        w_pos = w.clamp(min=0)
        part = _rowdot(w, worst_neg) + _rowdot(w_pos, worst_pos - worst_neg)
        acc = part if acc is None else acc + part
        v = (w * fold_neg).addcmul_(w_pos, fold_pos - fold_neg)
        del w, w_pos
        if t in out_edges:  # f_j = ... + A_{m<-t}[j, :] h_t: a dot product ends this path
            acc += _rowdot(v, out_edges[t][:, :, None, :])
        for u, pushed in net.push_from(t, v).items():  # [B, c, K, n_u]
            pending[u] = pushed if u not in pending else pending[u] + pushed
    return acc


@dataclass
class LinkedPreactivations:
    r"""Linear bounds that tie the derivatives of smooth activations to the input x.

    For an activation node t in ``nodes``: CROWN's lines  lA x + lb <= z_t(x) <= uA x + ub
    (``lA, uA: [B, n_t, n_0]``, ``lb, ub: [B, n_t]``) and lines of sigma_t' in z over the
    pre-activation interval,  alpha_lo z + beta_lo <= sigma_t'(z) <= alpha_hi z + beta_hi, with
    ``ref`` = sigma_t' at the interval's midpoint (``[B, n_t]`` each).  ``concretize(X)``
    returns max over the region of X . x for coefficients ``X: [B, c, K, n_0]`` -> ``[B, c, K]``;
    ``x_magnitude``: ``[B, n_0]``, a bound on |x| over the region (for the rounding margin).
    ``forward``: the forward network's lines around the centre (:class:`ForwardLines`), when
    every activation below the last node in ``nodes`` has lines; then the z coefficients are
    also back-substituted jointly (:func:`_joint_back_substitution`) and the smaller bound kept.
    """

    nodes: dict[int, tuple[Tensor, ...]]
    concretize: Callable[[Tensor], Tensor]
    x_magnitude: Tensor
    forward: ForwardLines | None = None


@dataclass
class ForwardLines:
    r"""The forward network around its value at the centre x_c, for the joint back-substitution
    of :func:`linked_upper_sweep` (:func:`_joint_back_substitution`).

    With dz_t = z_t(x) - z_t(x_c) and dh_t = h_t(x) - h_t(x_c) (dh_0 = x - x_c), the affine maps
    give  dz_t = sum_s A_{t<-s} dh_s  exactly (the biases cancel), and for activation nodes t:

        a_lo dz_t + d_lo <= dh_t <= a_hi dz_t + d_hi       (``lines[t]``, each ``[B, n_t]``)

    for every x of the region: sigma_t's lines over the pre-activation interval, shifted to the
    centre (d_hi = a_hi z_c + c_hi - sigma(z_c) >= 0, d_lo <= 0).  ``z_center[t]``, ``[B, n_t]``;
    ``x_center``, ``[B, n_0]``.  For the rounding margin: ``z_spread[t]`` bounds |dz_t| and
    ``reach[t] >= sum_s |A_{t<-s}| (bound(|dh_s|) + |h_s(x_c)|) + |z_c|`` (``[B, n_t]``), so
    that the errors of the matrix products and of the centre's computed values (which satisfy
    the affine maps only up to rounding) are covered.  Nodes 1..T, T the last node with lines.
    """

    x_center: Tensor
    z_center: dict[int, Tensor]
    lines: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]
    z_spread: dict[int, Tensor]
    reach: dict[int, Tensor]


def _joint_back_substitution(net: JacobianDAG, k_z: dict[int, Tensor]
                             ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Upper bound of  sum_t k_z[t] . z_t(x)  (``k_z[t]: [B, c, K, n_t]``) as  const + X . x,
    by one back-substitution through the forward network (CROWN's way, but for all the nodes'
    coefficients together).

    Write sum_t k_t . z_t = sum_t k_t . z_t(x_c) + sum_t k_t . dz_t.  From the last node down,
    the coefficient of dz_t is Lambda_t = k_t + a_hi H_t^+ + a_lo H_t^-, where H_t is the
    coefficient that the later nodes put on dh_t (H_t = sum_u Lambda_u A_{u<-t}) and its positive
    and negative parts take the upper and lower lines of ``ForwardLines`` (adding
    H_t^+ . d_hi + H_t^- . d_lo); at the input H_0 . dh_0 = H_0 . (x - x_c).  Bounding each z_t
    with its own CROWN line instead relaxes every activation below once per (row, neuron) with
    the sign of that line's coefficient; here the signs of the summed coefficients choose, which
    is never worse for the same lines and is what a single linear bound over the whole graph
    does.  Returns ``(const [B, c, K], X [B, c, K, n_0], abs_terms [B, c, K])``; ``abs_terms``
    sums the magnitudes that rounding can act on (see :func:`linked_upper_sweep`).
    """
    fw = net.linked.forward
    preds: dict[int, list[int]] = {}
    for s, t in net.edges:
        preds.setdefault(t, []).append(s)
    some = next(iter(k_z.values()))
    const = some.new_zeros(some.shape[:-1])  # [B, c, K]
    abs_terms = some.new_zeros(some.shape[:-1])
    coef_h: dict[int, Tensor] = {}  # H_s, the coefficients of dh_s
    for t in range(max(k_z), 0, -1):
        lam, h = k_z.get(t), coef_h.pop(t, None)
        if lam is not None:
            zc = fw.z_center[t][:, None, None, :]
            const += _rowdot(lam, zc)
            abs_terms += _rowdot(lam.abs(), zc.abs())
        if h is not None:
            a_lo, d_lo, a_hi, d_hi = (v[:, None, None, :] for v in fw.lines[t])
            h_pos, h_neg = h.clamp(min=0), h.clamp(max=0)
            relaxed = h_pos * a_hi + h_neg * a_lo
            lam = relaxed if lam is None else lam + relaxed
            offset = h_pos * d_hi + h_neg * d_lo
            const += offset.sum(-1)
            abs_terms += offset.abs().sum(-1)
        if lam is None:
            continue
        # rounding: Lambda_t itself (times |dz_t|) and the products pushing it into the dh_s
        abs_terms += _rowdot(lam.abs(), (fw.z_spread[t] + fw.reach[t])[:, None, None, :])
        for s in preds.get(t, []):
            pushed = lam @ net.edges[(s, t)]  # [B, c, K, n_s]
            coef_h[s] = pushed if s not in coef_h else coef_h[s] + pushed
    x_coef = coef_h.get(0)
    if x_coef is None:
        x_coef = some.new_zeros(*some.shape[:-1], net.n_in)
    xc = fw.x_center[:, None, None, :]
    return const - _rowdot(x_coef, xc), x_coef, abs_terms + _rowdot(x_coef.abs(), xc.abs())


def _linked_step(net: JacobianDAG, bounds: BackwardBounds, t: int, w: Tensor,
                 plane: str = "near") -> tuple[Tensor, ...]:
    """One linked node of :func:`linked_upper_sweep` for vectors ``w [B, c, K, n_t]``.

    Returns ``(part, v, k_z, lines, step_x, abs_x, abs_part, abs_lines)``: the constant terms of
    the planes and the lines of sigma' (``[B, c, K]``), the folded vector and the coefficients of
    z_t (``[B, c, K, n_t]``), the constants of CROWN's lines of z_t and the x coefficients they
    give (``[B, c, K, n_0]``), and the absolute values for the rounding margin (the x
    coefficients', the planes', the lines').
    """
    l_a, l_b, u_a, u_b, alpha_lo, beta_lo, alpha_hi, beta_hi, ref = (
        net.linked.nodes[t][:4] + tuple(x[:, None, None, :] for x in net.linked.nodes[t][4:]))
    d_lo = bounds.lower[t][:, :, None, :]  # [B, c, 1, n]: L
    d_hi = bounds.upper[t][:, :, None, :]  # U
    a = net.g_lo[t - 1][:, None, None, :]
    b = net.g_hi[t - 1][:, None, None, :]
    # the plane exact at s = a, else the one exact at s = b (see linked_upper_sweep)
    near_a = (ref - a) <= (b - ref) if plane == "near" else torch.ones_like(ref, dtype=torch.bool)
    coef_d = torch.where(near_a, a, b)  # [B, 1, 1, n]
    coef_s = torch.where(near_a == (w > 0), d_hi, d_lo)  # U or L: [B, c, K, n]
    v = w * coef_d  # the plane's D term, folded downstream
    k_s = w * coef_s  # the plane's s term
    above = k_s > 0  # s <= alpha_hi z + beta_hi, else s >= alpha_lo z + beta_lo
    beta = torch.where(above, beta_hi, beta_lo)
    k_z = k_s * torch.where(above, alpha_hi, alpha_lo)
    k_pos, k_neg = k_z.clamp(min=0), k_z.clamp(max=0)  # z <= uA x + ub, z >= lA x + lb
    product = v * coef_s
    part = (k_s * beta - product).sum(-1)
    lines = _rowdot(k_pos, u_b[:, None, None, :]) + _rowdot(k_neg, l_b[:, None, None, :])
    batch, c, k, n = k_z.shape
    flat_pos, flat_neg = k_pos.reshape(batch, c * k, n), k_neg.reshape(batch, c * k, n)
    step_x = (flat_pos @ u_a + flat_neg @ l_a).reshape(batch, c, k, -1)
    abs_x = (flat_pos @ u_a.abs() - flat_neg @ l_a.abs()).reshape(batch, c, k, -1)
    abs_part = product.abs().sum(-1) + (k_s * beta).abs().sum(-1)
    abs_lines = (_rowdot(k_pos, u_b.abs()[:, None, None, :])
                 - _rowdot(k_neg, l_b.abs()[:, None, None, :]))
    return part, v, k_z, lines, step_x, abs_x, abs_part, abs_lines


def linked_upper_sweep(net: JacobianDAG, bounds: BackwardBounds, pending: dict[int, Tensor],
                       keep_x: bool = False, plane: str = "near"
                       ) -> Tensor | tuple[Tensor, Tensor]:
    r"""Upper bound of  sum_t Q_j(w_t, t)  like :func:`upper_sweep`, with the derivatives of the
    nodes in ``net.linked`` kept as linear functions of the input x.

    At such a node, each term D sigma' w (D = D_t[j, r] in [L, U], s = sigma'(z_r) in [a, b]) is
    bounded by a McCormick plane of the product: for w > 0 from above by
    U s + a D - a U  or  L s + b D - b L, for w < 0 from below by  L s + a D - a L  or
    U s + b D - b U.  The first of each pair is exact where s = a, the second where s = b.
    ``plane="near"`` chooses the one whose exact side is nearer to sigma' at the interval's
    midpoint; ``plane="low"`` always the first, which puts the smallest derivative a on the D
    term folded downstream and the rest on s, which stays tied to x (measured: tighter on the
    digits tanh net, looser on random deeper ones; the linear method runs both and keeps the
    smaller).  The plane's D coefficient folds into the downstream vector as in RecurJac; its s
    term is replaced by the line of sigma' in z (above or below by the sign of its coefficient),
    and z by CROWN's line in x (likewise); the x coefficients of all nodes add up and are
    concretised over the region once, at the end, so the derivatives of different neurons and
    layers stay tied to the same x.  Other nodes (ReLU, leaky ReLU, ...) take the chord
    relaxation.

    With ``net.linked.forward`` the z coefficients are also bounded another way: collected over
    all nodes and back-substituted through the forward network at once
    (:func:`_joint_back_substitution`); the smaller of the two bounds is returned (both hold).

    Rounding: the terms that RecurJac does not have (the planes' s and constant terms, the lines
    in z and x and their concretisation, the back-substitution's products) are summed in
    absolute value alongside, and the result is raised by 4 gamma_N times that sum (N: all
    neurons and inputs plus a few per level), so that floating point cannot push it below the
    value in exact arithmetic; the other terms are RecurJac's and are covered by
    :func:`rounding_slack`.

    Returns ``[B, c, K]``; ``pending`` is consumed.  With ``keep_x`` the x coefficients are not
    concretised: returns ``(const [B, c, K], X [B, c, K, n_0])`` with the upper bound
    ``const + X . x`` holding at every x of the region (the rounding margin is in ``const``; of
    the two ways, the one with the smaller maximum over the region, entry by entry).
    """
    m, linked = net.depth, net.linked
    acc = None
    lines_acc = None  # [B, c, K]: constants of CROWN's lines of z
    coef_x = None  # [B, c, K, n_0]: their x coefficients
    abs_acc = None  # [B, c, K]: |terms| of the planes and the lines of sigma'
    abs_lines = None  # [B, c, K]: |constants| of the lines of z
    abs_x = None  # [B, c, K, n_0]: |coefficients| of x, term by term
    k_z: dict[int, Tensor] = {}
    out_edges = net.output_edges()
    for t in range(min(pending), m):
        w = pending.pop(t, None)
        if w is None:
            continue
        if t not in linked.nodes:
            fold_pos, fold_neg, worst_pos, worst_neg = _sweep_coefficients(net, bounds, t, True)
            w_pos = w.clamp(min=0)
            part = _rowdot(w, worst_neg) + _rowdot(w_pos, worst_pos - worst_neg)
            v = (w * fold_neg).addcmul_(w_pos, fold_pos - fold_neg)
        else:
            part, v, k_z[t], lines, step_x, step_abs, mag, mag_lines = _linked_step(
                net, bounds, t, w, plane)
            if coef_x is None:
                lines_acc, coef_x, abs_x, abs_acc, abs_lines = (lines, step_x, step_abs, mag,
                                                                mag_lines)
            else:
                lines_acc, coef_x, abs_x = lines_acc + lines, coef_x + step_x, abs_x + step_abs
                abs_acc, abs_lines = abs_acc + mag, abs_lines + mag_lines
        acc = part if acc is None else acc + part
        del w
        if t in out_edges:
            acc += _rowdot(v, out_edges[t][:, :, None, :])
        for u, pushed in net.push_from(t, v).items():
            pending[u] = pushed if u not in pending else pending[u] + pushed
    if coef_x is None:
        return (acc, acc.new_zeros(*acc.shape, net.n_in)) if keep_x else acc
    n_terms = sum(net.sizes.values()) + net.n_in + 16 * (m + 1)
    unit = torch.finfo(acc.dtype).eps / 2
    gamma4 = 4 * (n_terms * unit / (1 - n_terms * unit))
    x_mag = linked.x_magnitude[:, None, None, :]
    crown_const = acc + lines_acc + gamma4 * (
        abs_acc + abs_lines + ((abs_x + coef_x.abs()) * x_mag).sum(-1))
    crown_max = crown_const + linked.concretize(coef_x)
    if linked.forward is None:
        return (crown_const, coef_x) if keep_x else crown_max
    joint_const, joint_x, joint_abs = _joint_back_substitution(net, k_z)
    joint_const = acc + joint_const + gamma4 * (abs_acc + joint_abs
                                                + (joint_x.abs() * x_mag).sum(-1))
    joint_max = joint_const + linked.concretize(joint_x)
    if not keep_x:
        return torch.minimum(crown_max, joint_max)
    use_joint = joint_max < crown_max
    return (torch.where(use_joint, joint_const, crown_const),
            torch.where(use_joint[..., None], joint_x, coef_x))


def input_lines(net: JacobianDAG, bounds: BackwardBounds, slack: Tensor, lower: Tensor,
                upper: Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS
                ) -> tuple[Tensor, ...] | None:
    """Linear bounds of every Jacobian entry in the input, from the linked sweep at node 0:
    ``(lo_const, lo_X, hi_const, hi_X)`` with

        lo_const + lo_X . x <= J[j, k](x) <= hi_const + hi_X . x     for x in the region,

    ``*_const: [B, c, n_0]``, ``*_X: [B, c, n_0, n_0]`` (entry (j, k), then x).  Where a line's
    maximum (minimum) over the region is no better than the final constant bounds ``lower`` /
    ``upper`` (``[B, c, n_0]``), the constant is used (X = 0).  ``slack`` (``[B, c, n_0]``) is
    the rounding margin of the constant bounds, added to the lines too.  ``bounds`` must hold
    D_t for t >= 1.  None without linked nodes, or when the two ``X`` tensors would exceed
    ``MAX_LINE_ELEMENTS`` elements (then the constant bounds serve).
    """
    if net.linked is None or not net.linked.nodes:
        return None
    m, batch, c, n = net.depth, net.batch, net.n_out, net.n_in
    if 2 * batch * c * n * n > MAX_LINE_ELEMENTS:  # the X tensors would not fit: constants
        return None
    const = net.output_edges().get(0)
    base = const if const is not None else torch.zeros(batch, c, n, dtype=slack.dtype,
                                                       device=slack.device)
    hi_c, lo_c = base.clone(), base.clone()
    hi_x = torch.zeros(batch, c, n, n, dtype=slack.dtype, device=slack.device)
    lo_x = torch.zeros_like(hi_x)
    if any(t < m for t in net.successors[0]):
        widest = max(max(net.sizes[t] for t in range(1, m)), n)
        for cols in _chunks(n, max(1, max_elements // max(1, batch * c * 2 * widest))):
            k = cols.stop - cols.start
            out, coef = _best_line(net, bounds, cols)
            hi_c[:, :, cols] += out[..., :k]
            hi_x[:, :, cols] = coef[:, :, :k]
            lo_c[:, :, cols] -= out[..., k:]
            lo_x[:, :, cols] = -coef[:, :, k:]
    hi_c, lo_c = hi_c + slack, lo_c - slack
    concretize = net.linked.concretize
    hi_better = hi_c + concretize(hi_x) < upper
    lo_better = lo_c - concretize(-lo_x) > lower
    hi_c = torch.where(hi_better, hi_c, upper)
    lo_c = torch.where(lo_better, lo_c, lower)
    hi_x = torch.where(hi_better[..., None], hi_x, torch.zeros_like(hi_x))
    lo_x = torch.where(lo_better[..., None], lo_x, torch.zeros_like(lo_x))
    return lo_c, lo_x, hi_c, hi_x


def _best_line(net: JacobianDAG, bounds: BackwardBounds, cols: slice) -> tuple[Tensor, Tensor]:
    """The linked sweep's line ``const + X . x`` for the columns ``cols`` under both plane rules,
    entry by entry the one with the smaller maximum over the region."""
    lines = [linked_upper_sweep(net, bounds, _start_vectors(net, 0, cols), keep_x=True,
                                plane=plane) for plane in ("near", "low")]
    (c1, x1), (c2, x2) = lines
    first = c1 + net.linked.concretize(x1) <= c2 + net.linked.concretize(x2)
    return torch.where(first, c1, c2), torch.where(first[..., None], x1, x2)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def _start_vectors(net: JacobianDAG, s: int, cols: slice) -> dict[int, Tensor]:
    """``w_t = [A_{t<-s}[:, cols], -A_{t<-s}[:, cols]]^T`` for the activation successors of s,
    each ``[B, c, 2K, n_t]`` (the upper chain and the mirrored lower chain)."""
    batch, c = net.batch, net.n_out
    pending = {}
    for t in net.successors[s]:
        if t < net.depth:
            w = net.edges[(s, t)][:, cols].T  # [K, n_t]
            pending[t] = torch.cat([w, -w], 0).expand(batch, c, -1, -1)
    return pending


def _linear_sweep(net: JacobianDAG, bounds: BackwardBounds, pending: dict[int, Tensor]
                  ) -> Tensor:
    """The ``linear`` method's sweep: the chord relaxation, and where ``net.linked`` is given
    also the sweeps tied to the input (both plane rules); the smallest (all are sound: the chord
    is the tightest bound in D alone, the planes win where the derivatives' ties to x matter)."""
    if net.linked is not None and net.linked.nodes:
        return torch.minimum(
            upper_sweep(net, bounds, dict(pending), linear=True),
            torch.minimum(linked_upper_sweep(net, bounds, dict(pending), plane="near"),
                          linked_upper_sweep(net, bounds, pending, plane="low")))
    return upper_sweep(net, bounds, pending, linear=True)


def recurjac_backward(net: JacobianDAG, *, intersect: bool = True,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, linear: bool = False
                      ) -> BackwardBounds:
    """RecurJac bounds of every backward partial D_{m-1}, ..., D_0 (spec section 3).

    With ``linear=True`` (``method="linear"``) two sets of bounds are kept: RecurJac's own
    (``reference`` of the result: its sweeps on its own bounds, exactly the ``recurjac``
    method) and the linear ones, at every node the intersection of RecurJac's sweep with the
    chord relaxation's (and the linked sweeps') on the linear bounds of the deeper nodes.  All
    are sound; the chord keeps the unsigned partial derivatives as linear functions, and the
    intersection at every node tightens what the deeper nodes classify and relax with.  The
    result is never looser than RecurJac, at about twice its cost.  (RecurJac's sweep on the
    linear method's tighter bounds is not run: a neuron can switch from a constant to a fold
    there, so it is not monotone in the bounds, and on the benchmark nets it never beat the
    other two.)

    Returns bounds with ``lower[0], upper[0]`` of shape ``[B, c, n_0]`` bounding J.
    """
    m, batch, c = net.depth, net.batch, net.n_out
    bounds = BackwardBounds([None] * m, [None] * m)
    ref = BackwardBounds([None] * m, [None] * m) if linear else bounds
    out_edges = net.output_edges()
    some = next(iter(net.edges.values()))
    for s in range(m - 1, -1, -1):
        n_cols = net.sizes[s]
        const = out_edges.get(s)
        lo = torch.zeros(batch, c, n_cols, dtype=some.dtype, device=some.device)
        if const is not None:
            lo = lo + const
        hi = lo.clone()
        ref_lo, ref_hi = lo.clone(), lo.clone()
        if any(t < m for t in net.successors[s]):
            widest = max(net.sizes[t] for t in range(s + 1, m))
            if linear and net.linked is not None:  # the x coefficients of the linked sweep
                widest = max(widest, net.n_in)
            per_col = max(1, batch * c * 2 * widest)
            for cols in _chunks(n_cols, max(1, max_elements // per_col)):
                k = cols.stop - cols.start
                out = upper_sweep(net, ref, _start_vectors(net, s, cols))
                ref_hi[:, :, cols] += out[..., :k]
                ref_lo[:, :, cols] -= out[..., k:]
                if linear:
                    out = torch.minimum(out, _linear_sweep(net, bounds,
                                                           _start_vectors(net, s, cols)))
                hi[:, :, cols] += out[..., :k]
                lo[:, :, cols] -= out[..., k:]
            if intersect:
                f_lo, f_hi = _fastlip_step(net, bounds, s)
                lo, hi = torch.maximum(lo, f_lo), torch.minimum(hi, f_hi)
                if linear:
                    f_lo, f_hi = _fastlip_step(net, ref, s)
                    ref_lo, ref_hi = torch.maximum(ref_lo, f_lo), torch.minimum(ref_hi, f_hi)
        if intersect and s == 0 and net.push is None:
            f_lo, f_hi = interval_forward(net)
            lo, hi = torch.maximum(lo, f_lo), torch.minimum(hi, f_hi)
            ref_lo, ref_hi = torch.maximum(ref_lo, f_lo), torch.minimum(ref_hi, f_hi)
        bounds.lower[s], bounds.upper[s] = lo, hi
        if linear:
            ref.lower[s], ref.upper[s] = ref_lo, ref_hi
            # RecurJac's own values hold too: never looser than RecurJac at any node
            bounds.lower[s] = torch.maximum(lo, ref_lo)
            bounds.upper[s] = torch.minimum(hi, ref_hi)
    if linear:
        bounds.reference = ref
    return bounds


def fastlip_backward(net: JacobianDAG) -> BackwardBounds:
    """Fast-Lip: D_s = A_{m<-s} + sum_t [D_t] [S_t] A_{t<-s} in interval arithmetic."""
    m = net.depth
    bounds = BackwardBounds([None] * m, [None] * m)
    for s in range(m - 1, -1, -1):
        bounds.lower[s], bounds.upper[s] = _fastlip_step(net, bounds, s)
    return bounds


def interval_forward(net: JacobianDAG) -> tuple[Tensor, Tensor]:
    """Plain interval products from the input side (``Z_t = dz_t/dx``): ``[B, c, n_0]`` each."""
    m, batch = net.depth, net.batch
    # T_s := [S_s][Z_s], the range of dh_s/dx: [B, n_s, n_0]; T_0 = I.
    t_lo: dict[int, Tensor] = {}
    t_hi: dict[int, Tensor] = {}
    for t in range(1, m + 1):
        z_lo = z_hi = None
        for (s, t2), a in net.edges.items():
            if t2 != t:
                continue
            if s == 0:
                lo = hi = a.expand(batch, *a.shape[-2:])
            else:
                lo, hi = _interval_matmul(t_lo[s].transpose(-1, -2), t_hi[s].transpose(-1, -2),
                                          a.transpose(-1, -2))
                lo, hi = lo.transpose(-1, -2), hi.transpose(-1, -2)
            z_lo = lo if z_lo is None else z_lo + lo
            z_hi = hi if z_hi is None else z_hi + hi
        if t == m:
            return z_lo, z_hi
        g_lo, g_hi = net.g_lo[t - 1][:, :, None], net.g_hi[t - 1][:, :, None]
        if z_lo is None:  # unreachable from the input: dh_t/dx = 0
            z_lo = z_hi = torch.zeros(batch, net.sizes[t], net.n_in, dtype=g_lo.dtype,
                                      device=g_lo.device)
        t_lo[t], t_hi[t] = _interval_mul(z_lo, z_hi, g_lo, g_hi)
    raise AssertionError("unreachable")


def merged_row_upper(net: JacobianDAG, bounds: BackwardBounds, signs: Tensor,
                     method: str) -> Tensor:
    """Upper bound of  J[j, :] . s_j  for one sign vector per row (the l1 merge, spec section 4).

    ``J[j,:] s_j = A_{m<-0}[j,:] s_j + sum_t Q_j(A_{t<-0} s_j, t)``: the Jacobian row of the
    network whose input layer is the single column s_j.  RecurJac bounds it with one sweep,
    Fast-Lip with one interval step.

    ``method="linear"`` takes the smaller of the RecurJac and the chord sweeps.  Any real
    weights work in place of signs (the joint norm bounds use chord slopes).

    Args:
        signs: ``[B, c, n_0]``, usually with entries in {-1, 0, +1}.

    Returns:
        ``[B, c]`` upper bounds.
    """
    m = net.depth
    const = net.output_edges().get(0)
    total = (signs * const).sum(-1) if const is not None else signs.new_zeros(signs.shape[:2])
    starts = {t: signs @ net.edges[(0, t)].T for t in net.successors[0] if t < m}  # [B, c, n_t]
    if not starts:
        return total
    if method in ("recurjac", "linear"):
        swept = upper_sweep(net, bounds, {t: w[:, :, None, :] for t, w in starts.items()})
        if method == "linear":
            swept = torch.minimum(swept, _linear_sweep(
                net, bounds, {t: w[:, :, None, :] for t, w in starts.items()}))
        return total + swept[..., 0]
    for t, w in starts.items():
        g_lo, g_hi = net.g_lo[t - 1][:, None, :], net.g_hi[t - 1][:, None, :]
        t_lo, t_hi = _interval_mul(bounds.lower[t], bounds.upper[t], g_lo, g_hi)
        total = total + torch.maximum(t_lo * w, t_hi * w).sum(-1)
    return total


# ----------------------------------------------------------------------------------------------
# floating point


def magnitude_product(net: JacobianDAG) -> Tensor:
    """M = sum over paths of |A_{m<-t}| G_t |A_{t<-s}| ... G_1 |A_{1<-0}|, ``[B, c, n_0]``,
    with G_t = diag(max(|g_lo|, |g_hi|)): an entrywise bound on the magnitude of every product
    term that any of the bound algorithms (and autograd's J(x)) sums up.

    The backward recursion R_s = |A_{m<-s}| + sum_t (R_t G_t) |A_{t<-s}| (R_s: ``[B, c, n_s]``),
    one matrix product per edge (half of a Fast-Lip pass).
    """
    m = net.depth
    out = {s: a.abs() for s, a in net.output_edges().items()}
    rows: dict[int, Tensor] = {}
    for s in range(m - 1, -1, -1):
        total = out.get(s)
        for t in net.successors[s]:
            if t == m:
                continue
            g = torch.maximum(net.g_lo[t - 1].abs(), net.g_hi[t - 1].abs())[:, None, :]
            step = (rows[t] * g) @ net.edges[(s, t)].abs()
            total = step if total is None else total + step
        if total is None:
            total = torch.zeros(net.batch, net.n_out, net.sizes[s],
                                dtype=net.g_lo[0].dtype, device=net.g_lo[0].device)
        rows[s] = total.expand(net.batch, net.n_out, net.sizes[s])
    return rows[0]


def rounding_slack(net: JacobianDAG) -> Tensor:
    """How far rounding can move a computed Jacobian bound, entrywise: ``[B, c, n_0]``.

    Every bound here, and the true J(x), is a sum over paths of products of edge entries and
    derivative values; in floating point (unit roundoff u) such a sum of products with N
    accumulated terms along the way is off by at most gamma_N * M, gamma_N = N u / (1 - N u)
    (Higham, Accuracy and Stability of Numerical Algorithms, section 3.5), where M is
    :func:`magnitude_product`.  The slack is 2 gamma_N M with N the number of neurons of all nodes
    plus a few operations per level: one gamma for the bound's own arithmetic and one for the
    value autograd computes at a point, so that neither can end up outside the other.
    """
    n_terms = sum(net.sizes.values()) + 8 * (net.depth + 1)
    unit = torch.finfo(next(iter(net.edges.values())).dtype).eps / 2
    gamma = n_terms * unit / (1 - n_terms * unit)
    return 2 * gamma * magnitude_product(net)
