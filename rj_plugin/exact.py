r"""The exact local Lipschitz constant of a small ReLU network, by mixed-integer programming.

For a ReLU network in the DAG form of :mod:`rj_plugin.recurjac` (activations h_t = relu(z_t),
z_t = sum_s A_{t<-s} h_s + b_t, h_0 = x) and one output row j, the gradient is the backward sum

    q_t = a_t * g_t,   g_s = A_{m<-s}[j, :] + sum_{t > s} A_{t<-s}^T q_t,   grad f_j(x) = g_0,

with a_t in {0, 1}^{n_t} the activation pattern at x (a_r = 1 where z_r > 0; either value where
z_r = 0, the two extreme elements of Clarke's generalised Jacobian).  Over an input region X the
quantity

    L_j = max_{x in X, a consistent with x} || g_0 ||_q          (q the dual of the region's p)

is the exact local Lipschitz constant of f_j on X (a maximum over the Clarke Jacobian, as in
LipMIP, Jordan & Dimakis 2020).  It is a mixed-integer linear program:

* the region: a box ``lo <= x <= hi`` (an l_inf ball is one), or an l_1 ball written with
  x = x0 + d+ - d-, d+, d- >= 0, sum (d+ + d-) <= eps;
* each unstable ReLU (its pre-activation interval [l, u] from CROWN straddles 0), with a binary a:
  h >= z, h >= 0, h <= z - l (1 - a), h <= u a; stable ones are fixed (h = z, a = 1 or h = 0,
  a = 0);
* the product q = a g with g in [G_lo, G_hi] (RecurJac's bounds of df_j/dh_t):
  q <= g - G_lo (1 - a), q >= g - G_hi (1 - a), G_lo a <= q <= G_hi a  (exact for binary a);
* the objective: for q = 1 (l_inf region) max sum_k t_k with t_k <= +-J_k + M_k (1 -+ s_k),
  s_k binary (t_k = |J_k| at the optimum; entries of certified sign need no binary); for
  q = inf (l_1 region) max over k and sign of +-J_k, one small program each, pruned by RecurJac's
  bounds.  An l_2 region is not linear and is refused.

Every big-M constant comes from a sound bound (CROWN for z, the ``linear`` method for g and J),
so the program is exact; scipy's HiGHS (``scipy.optimize.milp``) solves it.  Its reported dual
bound is the certified upper value (up to HiGHS's feasibility tolerances), the incumbent's
objective the lower one; the gap is reported.  Biases are recovered from one forward pass at
the region's center: b_t = z_t(x_c) - sum_s A_{t<-s} h_s(x_c).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from rj_plugin.api import JacobianBounder, as_bounder
from rj_plugin.errors import InputError, UnsupportedLayerError
from rj_plugin.lirpa import make_perturbation
from rj_plugin.region import Region

__all__ = ["ExactLipschitz", "exact_lipschitz"]

# Binary variables allowed by default (the activation patterns and the |J_k| signs).
DEFAULT_MAX_BINARIES = 400


@dataclass
class ExactLipschitz:
    """Exact local Lipschitz constants, one per (batch entry, row).

    Attributes:
        upper: ``[B, rows]``: the solver's dual bound (the maximum is at most this).
        lower: ``[B, rows]``: the value of the best activation pattern found (attained).
        status: ``[B][rows]``: ``"optimal"`` or ``"time limit"``.
        norm: the region's p (the constant is for the dual norm q of the gradient).
        seconds: total solve time.
    """

    upper: Tensor
    lower: Tensor
    status: list[list[str]]
    norm: float
    seconds: float
    binaries: list[int] = field(default_factory=list)

    @property
    def gap(self) -> Tensor:
        """Relative gap (upper - lower) / max(upper, tiny), ``[B, rows]``."""
        return (self.upper - self.lower) / self.upper.abs().clamp(min=1e-300)


class _Program:
    """A growing MILP: variables with bounds and integrality, sparse rows lb <= A v <= ub."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, lo: float, hi: float, integer: bool = False) -> int:
        self.lb.append(lo)
        self.ub.append(hi)
        self.integer.append(1 if integer else 0)
        return len(self.lb) - 1

    def vars(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return np.array([self.var(float(a), float(b)) for a, b in zip(lo, hi, strict=True)],
                        dtype=np.int64)

    def row(self, coeffs: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((coeffs, lo, hi))

    def solve(self, objective: dict[int, float], time_limit: float | None
              ) -> tuple[float, float, str, np.ndarray | None]:
        """Maximise ``objective . v``: (best value found, dual bound, status, solution)."""
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array

        n = len(self.lb)
        c = np.zeros(n)
        for k, v in objective.items():
            c[k] -= v  # milp minimises
        r, cidx, vals, lo, hi = [], [], [], [], []
        for i, (coeffs, a, b) in enumerate(self.rows):
            for k, v in coeffs.items():
                r.append(i)
                cidx.append(k)
                vals.append(v)
            lo.append(a)
            hi.append(b)
        constraints = []
        if self.rows:
            matrix = coo_array((vals, (r, cidx)), shape=(len(self.rows), n)).tocsr()
            constraints.append(LinearConstraint(matrix, np.array(lo), np.array(hi)))
        options = {"mip_rel_gap": 1e-9}
        if time_limit is not None:
            options["time_limit"] = max(0.1, float(time_limit))
        res = milp(c, integrality=np.array(self.integer), bounds=Bounds(self.lb, self.ub),
                   constraints=constraints, options=options)
        if res.x is None:
            raise RuntimeError(f"the MILP found no feasible point ({res.message})")
        best = -float(res.fun)
        dual = getattr(res, "mip_dual_bound", None)
        dual = best if dual is None or not np.isfinite(dual) else -float(dual)
        status = "optimal" if res.status == 0 else "time limit"
        return best, max(best, dual), status, res.x


def _relu_only(bounder: JacobianBounder) -> None:
    for act in bounder.jacobian_graph.activations:
        if act.activation.name != "relu":
            raise UnsupportedLayerError(
                f"method 'exact' handles ReLU networks only; node {act.node} is "
                f"{act.activation.name}")


def _forward_values(bounder: JacobianBounder, center: Tensor
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """At the center: h_s(x_c) for s = 0..m-1 (the input, then every activation's output) and
    z_t(x_c) for t = 1..m-1 (every activation's input), as flat float64 arrays."""
    module = bounder.graph.module
    with torch.no_grad():
        module(center[None])
    h = [center.reshape(-1)]
    z = []
    for act in bounder.jacobian_graph.activations:
        h.append(module[act.node].forward_value.reshape(-1))
        z.append(module[act.input_node].forward_value.reshape(-1))
    as_np = lambda v: v.detach().cpu().double().numpy()  # noqa: E731
    return [as_np(v) for v in h], [as_np(v) for v in z]


def exact_lipschitz(model: nn.Module | str | JacobianBounder, x0=None, eps=None,
                    norm="inf", *, lower=None, upper=None, C: Tensor | None = None,
                    time_limit: float | None = 60.0,
                    max_binaries: int = DEFAULT_MAX_BINARIES) -> ExactLipschitz:
    """The exact local Lipschitz constant (dual norm of the gradient) of each row of ``C f``.

    Args:
        model: a ReLU network (``nn.Module``, path, demo name) or a prepared
            :class:`~rj_plugin.api.JacobianBounder`.
        x0, eps, norm: an l_inf or l_1 ball (l_2 is not linear: refused); or ``lower, upper``
            (a box).
        C: ``[k, n_out]`` rows (default: the outputs).
        time_limit: seconds per program (the result says ``"time limit"`` where it was hit;
            ``upper`` stays a valid bound, ``lower`` an attained value).
        max_binaries: refuse programs with more binary variables than this.

    Returns:
        :class:`ExactLipschitz`.

    Raises:
        UnsupportedLayerError: a non-ReLU activation.
        InputError: an l_2 region, or a program over the size limit (the error gives the count).
    """
    start = time.perf_counter()
    bounder = as_bounder(model, x0, lower)
    _relu_only(bounder)
    region = bounder.region(x0, eps, norm, lower, upper)
    if region.norm == 2.0:
        raise InputError("method 'exact' needs a linear region: an l_inf or l_1 ball or a box "
                         "(an l_2 ball is not a set of linear constraints)")
    jb = bounder.bound(region, preact="crown", method="linear", C=C)  # tightest big-M
    preact = bounder.graph.preactivation_bounds(
        region.center, make_perturbation(region.norm, region.eps, region.lower, region.upper),
        bounder.preact_nodes, "crown")
    net, back = jb._net, jb._backward
    m, rows = net.depth, net.n_out
    uppers = torch.zeros(region.batch, rows, dtype=torch.float64)
    lowers = torch.zeros_like(uppers)
    statuses: list[list[str]] = []
    binaries: list[int] = []
    for b in range(region.batch):
        sub = region.select(slice(b, b + 1))
        pre = [tuple(t[b].reshape(-1).cpu().double().numpy() for t in preact[name])
               for name in bounder.preact_nodes]
        h_center, z_center = _forward_values(bounder, sub.center[0])
        edges = {e: (a[b] if a.dim() == 3 else a).cpu().double().numpy()
                 for e, a in net.edges.items()}
        row_status = []
        for j in range(rows):
            g_bounds = {t: (back.lower[t][b, j].cpu().double().numpy(),
                            back.upper[t][b, j].cpu().double().numpy()) for t in range(1, m)}
            j_lo = jb.lower[b, j].reshape(-1).cpu().double().numpy()
            j_hi = jb.upper[b, j].reshape(-1).cpu().double().numpy()
            hi_val, lo_val, status, n_bin = _solve_row(
                sub, edges, pre, (h_center, z_center), g_bounds, (j_lo, j_hi), j, m,
                time_limit, max_binaries)
            uppers[b, j], lowers[b, j] = hi_val, lo_val
            row_status.append(status)
            binaries.append(n_bin)
        statuses.append(row_status)
    return ExactLipschitz(uppers, lowers, statuses, region.norm, time.perf_counter() - start,
                          binaries)


def _solve_row(region: Region, edges: dict, pre: list,
               at_center: tuple[list[np.ndarray], list[np.ndarray]], g_bounds: dict,
               j_bounds: tuple[np.ndarray, np.ndarray], row: int, m: int,
               time_limit: float | None, max_binaries: int) -> tuple[float, float, str, int]:
    """(upper, lower, status, binaries) of the exact constant of one row over one region."""
    prog = _Program()
    center = region.center[0].reshape(-1).cpu().double().numpy()
    n0 = center.size
    # -- the region ------------------------------------------------------------------------
    if region.is_box:
        lo = region.lower[0].reshape(-1).cpu().double().numpy()
        hi = region.upper[0].reshape(-1).cpu().double().numpy()
        x = prog.vars(lo, hi)
    else:
        eps = float(region.eps)
        x = prog.vars(center - eps, center + eps)
        if math.isfinite(region.norm) and region.norm == 1.0:
            dp = prog.vars(np.zeros(n0), np.full(n0, eps))
            dn = prog.vars(np.zeros(n0), np.full(n0, eps))
            for k in range(n0):  # x_k - dp_k + dn_k = x0_k
                prog.row({int(x[k]): 1.0, int(dp[k]): -1.0, int(dn[k]): 1.0}, center[k],
                         center[k])
            prog.row({int(v): 1.0 for v in np.concatenate([dp, dn])}, -np.inf, eps)
    # -- the forward pass: z_t = sum_s A_{t<-s} h_s + b_t, h_t = relu(z_t) ----------------------
    h: dict[int, np.ndarray] = {0: x}
    active: dict[int, np.ndarray] = {}  # a_t: variable index, or -1 (fixed 0) / -2 (fixed 1)
    n_binary = 0
    for t in range(1, m):
        z_lo, z_hi = pre[t - 1]
        incoming = [(s, a) for (s, t2), a in edges.items() if t2 == t]
        h_center, z_center = at_center
        bias = z_center[t - 1] - sum(a @ h_center[s] for s, a in incoming)
        n_t = z_lo.size
        h_t = np.empty(n_t, dtype=np.int64)
        a_t = np.empty(n_t, dtype=np.int64)
        for r in range(n_t):
            l_r, u_r = float(z_lo[r]), float(z_hi[r])
            coeffs: dict[int, float] = {}
            for s, a in incoming:
                for k in np.nonzero(a[r])[0]:
                    coeffs[int(h[s][k])] = coeffs.get(int(h[s][k]), 0.0) + float(a[r, k])
            z = prog.var(l_r, u_r)
            coeffs[z] = coeffs.get(z, 0.0) - 1.0
            prog.row(coeffs, -float(bias[r]), -float(bias[r]))  # sum A h - z = -b
            if l_r >= 0:
                h_t[r], a_t[r] = z, -2
                continue
            hv = prog.var(0.0, max(u_r, 0.0))
            h_t[r] = hv
            if u_r <= 0:
                a_t[r] = -1
                prog.row({hv: 1.0}, 0.0, 0.0)
                continue
            av = prog.var(0.0, 1.0, integer=True)
            n_binary += 1
            a_t[r] = av
            prog.row({hv: 1.0, z: -1.0}, 0.0, np.inf)                  # h >= z
            prog.row({hv: 1.0, z: -1.0, av: -l_r}, -np.inf, -l_r)      # h <= z - l (1 - a)
            prog.row({hv: 1.0, av: -u_r}, -np.inf, 0.0)                # h <= u a
        h[t], active[t] = h_t, a_t
    # -- the backward pass: q_t = a_t g_t, g_s = A_{m<-s}[row] + sum_t A_{t<-s}^T q_t ------------
    q: dict[int, np.ndarray] = {}
    g: dict[int, np.ndarray] = {}
    for s in range(m - 1, -1, -1):
        n_s = h[s].size
        const = edges[(s, m)][row] if (s, m) in edges else np.zeros(n_s)
        if s == 0:
            lo_s, hi_s = j_bounds
        else:
            lo_s, hi_s = g_bounds[s]
        g_s = prog.vars(np.minimum(lo_s, hi_s), np.maximum(lo_s, hi_s))
        for k in range(n_s):
            coeffs = {int(g_s[k]): 1.0}
            for t in range(s + 1, m):
                if (s, t) not in edges:
                    continue
                col = edges[(s, t)][:, k]
                for r in np.nonzero(col)[0]:
                    if active[t][r] == -1:
                        continue
                    key = int(q[t][r])
                    coeffs[key] = coeffs.get(key, 0.0) - float(col[r])
            prog.row(coeffs, float(const[k]), float(const[k]))
        g[s] = g_s
        if s == 0:
            break
        q_s = np.empty(n_s, dtype=np.int64)
        for r in range(n_s):
            a_r = int(active[s][r])
            if a_r == -2:
                q_s[r] = g_s[r]
            elif a_r == -1:
                q_s[r] = -1
            else:
                lo_g, hi_g = float(min(lo_s[r], hi_s[r])), float(max(lo_s[r], hi_s[r]))
                qv = prog.var(min(lo_g, 0.0), max(hi_g, 0.0))
                gv = int(g_s[r])
                prog.row({qv: 1.0, gv: -1.0, a_r: -lo_g}, -np.inf, -lo_g)   # q <= g - G_lo(1-a)
                prog.row({qv: 1.0, gv: -1.0, a_r: -hi_g}, -hi_g, np.inf)    # q >= g - G_hi(1-a)
                prog.row({qv: 1.0, a_r: -hi_g}, -np.inf, 0.0)                # q <= G_hi a
                prog.row({qv: 1.0, a_r: -lo_g}, 0.0, np.inf)                 # q >= G_lo a
                q_s[r] = qv
        q[s] = q_s
    grad = g[0]
    j_lo, j_hi = j_bounds
    # -- the objective ------------------------------------------------------------------------
    if math.isinf(region.norm):  # max sum_k |J_k|
        objective: dict[int, float] = {}
        for k in range(n0):
            if j_lo[k] >= 0:
                objective[int(grad[k])] = objective.get(int(grad[k]), 0.0) + 1.0
            elif j_hi[k] <= 0:
                objective[int(grad[k])] = objective.get(int(grad[k]), 0.0) - 1.0
            else:
                big = 2.0 * max(abs(j_lo[k]), abs(j_hi[k]))
                tk = prog.var(0.0, max(abs(j_lo[k]), abs(j_hi[k])))
                sk = prog.var(0.0, 1.0, integer=True)
                n_binary += 1
                prog.row({tk: 1.0, int(grad[k]): -1.0, sk: big}, -np.inf, big)  # t <= J + M(1-s)
                prog.row({tk: 1.0, int(grad[k]): 1.0, sk: -big}, -np.inf, 0.0)  # t <= -J + M s
                objective[tk] = 1.0
        _check_size(n_binary, max_binaries)
        best, dual, status, _ = prog.solve(objective, time_limit)
        return dual, best, status, n_binary
    _check_size(n_binary, max_binaries)
    # l_1 region: max_k |J_k|, one program per (k, sign), the most promising first, pruned.
    candidates = sorted([(max(j_hi[k], 0.0), k, 1.0) for k in range(n0)] +
                        [(max(-j_lo[k], 0.0), k, -1.0) for k in range(n0)], reverse=True)
    best_lo, best_hi, status = 0.0, 0.0, "optimal"
    for bound, k, sign in candidates:
        if bound <= best_lo:
            best_hi = max(best_hi, bound)
            continue
        value, dual, st, _ = prog.solve({int(grad[k]): sign}, time_limit)
        best_lo, best_hi = max(best_lo, value), max(best_hi, dual)
        if st != "optimal":
            status = st
    return max(best_hi, best_lo), best_lo, status, n_binary


def _check_size(n_binary: int, max_binaries: int) -> None:
    if n_binary > max_binaries:
        raise InputError(f"the exact program needs {n_binary} binary variables, over the limit "
                         f"of {max_binaries} (max_binaries): use method 'recurjac' (a sound "
                         "upper bound) or a smaller region")
