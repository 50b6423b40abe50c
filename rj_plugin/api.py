"""The Python API: ``bound_jacobian`` and the reusable ``JacobianBounder``.

    model -> LirpaGraph (auto_LiRPA BoundedModule) -> JacobianGraph (graph transformation)
          -> dense linear maps A_{t<-s}  +  pre-activation bounds -> derivative ranges
          -> recurjac | fastlip | interval  ->  JacobianBounds
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rj_plugin import lipschitz as lip
from rj_plugin import recurjac as rj
from rj_plugin.chain import JacobianGraph, build_graph
from rj_plugin.errors import InputError, UnsupportedLayerError
from rj_plugin.lirpa import PREACT_METHODS, LirpaGraph, make_perturbation
from rj_plugin.models import load_model
from rj_plugin.region import Region, make_region

METHODS = ("recurjac", "linear", "fastlip", "interval")


@dataclass
class JacobianBounds:
    """Certified element-wise bounds of the Jacobian over a region.

    Attributes:
        lower, upper: ``[B, n_out, *input_shape]``; ``lower <= d f_j / d x_k (x) <= upper`` for
            every x in the region (rows are those of ``C @ f`` when a C was given).
        region: the input region.
        method: ``recurjac`` | ``linear`` | ``fastlip`` | ``interval``.
        preact: the pre-activation bound method (``ibp`` | ``crown`` | ``crown-ibp`` |
            ``alpha-crown``; ``none`` for global bounds).
        timings: seconds spent per phase.
    """

    lower: Tensor
    upper: Tensor
    region: Region
    method: str
    preact: str
    timings: dict[str, float] = field(default_factory=dict)
    _net: rj.JacobianDAG | None = field(default=None, repr=False)
    _backward: rj.BackwardBounds | None = field(default=None, repr=False)
    _options: dict[str, Any] = field(default_factory=dict, repr=False)
    _activation_max: list[float] = field(default_factory=list, repr=False)
    _slack: Tensor | None = field(default=None, repr=False)
    _reference: JacobianBounds | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return self.lower.shape[0]

    @property
    def n_out(self) -> int:
        return self.lower.shape[1]

    def _flat(self) -> tuple[Tensor, Tensor]:
        return self.lower.flatten(2), self.upper.flatten(2)

    def with_spec(self, C: Tensor) -> JacobianBounds:
        """Bounds for the rows of ``C @ f(x)``, C folded into the last layer (spec section 1).

        ``C``: ``[k, n_out]`` shared by the batch, or ``[B, k, n_out]``.
        """
        spec_net = self._net.with_spec(_check_spec(C, self._net))
        return _run_algorithm(spec_net, self.region, self.method, self.preact,
                              self.lower.shape[2:], dict(self.timings), self._options,
                              self._activation_max)

    def lipschitz(self, C: Tensor | None = None, norm: float | None = None) -> Tensor:
        """Per-row bound on the dual norm q of the gradient over the region, ``[B, rows]``.

        Rows are the outputs, or those of ``C @ f`` (margins) with C folded into the last layer.
        ``norm`` (p) overrides the region's norm in choosing q (e.g. a box that covers part of an
        l_2 ball).  The smallest of the bounds in :meth:`lipschitz_candidates`.
        """
        return torch.stack(list(self.lipschitz_candidates(C, norm).values())).amin(0)

    def lipschitz_candidates(self, C: Tensor | None = None, norm: float | None = None
                             ) -> dict[str, Tensor]:
        r"""Every sound bound of the rows' dual norms this object can give, ``name -> [B, rows]``.

        * ``elementwise``: the norm of M = max(|L|, |U|) (see :mod:`rj_plugin.lipschitz`);
        * ``merged`` (l_inf regions): the l1 merge over the columns of certified sign;
        * ``joint`` (l_inf and l_2 regions; not for ``interval``): one more sweep of the bound
          algorithm for a whole row at once.  Each |J_k| (l_inf region, q = 1) or J_k^2 (l_2,
          q = 2) is bounded above by its chord over [L_k, U_k]:

              |J_k| <= s_k J_k + c_k,  s_k = (U + L) / (U - L),  c_k = -2 U L / (U - L)
                      (s_k = sign, c_k = 0 where the sign is certified),
              J_k^2 <= (L_k + U_k) J_k - L_k U_k,

          so ||J_j||_1 <= UB[J_j . s] + sum c_k and ||J_j||_2^2 <= UB[J_j . (L + U)] - sum L U,
          where UB[J_j . w] is one sweep for the network whose first layer is the single column
          A w: the dependence between the columns survives, which element-wise bounds lose.

        ``min(candidates)`` is :meth:`lipschitz`; the argmin says which bound was active.
        """
        if C is not None:
            return self.with_spec(C).lipschitz_candidates(norm=norm)
        lower, upper = self._flat()
        norm = self.region.norm if norm is None else norm
        out = {"elementwise": lip.row_lipschitz(lower, upper, norm)}
        if self.method == "interval" or norm == 1.0:
            return out
        if math.isinf(norm):
            signs = lip.fixed_signs(lower, upper)
            out["merged"] = lip.row_lipschitz(lower, upper, norm, self._row_upper(signs))
            weights, offset = lip.abs_chord(lower, upper)
            out["joint"] = self._row_upper(weights).clamp(min=0) + offset
        else:
            weights, offset = lip.square_chord(lower, upper)
            out["joint"] = (self._row_upper(weights) + offset).clamp(min=0).sqrt()
        if self._reference is not None:  # linear: never looser than RecurJac's own values
            for name, value in self._reference.lipschitz_candidates(norm=norm).items():
                out[f"recurjac-{name}"] = value
        return out

    def _row_upper(self, weights: Tensor) -> Tensor:
        """Upper bound of  J[j, :] . w_j  over the region for ``weights`` ``[B, c, n]``, rounded
        outwards: ``[B, c]``."""
        value = rj.merged_row_upper(self._net, self._backward, weights, self.method)
        if self._slack is not None:  # the sweep sums the same products as the bounds
            value = value + (self._slack * weights.abs()).sum(-1)
        return value

    def induced_norm(self) -> Tensor:
        """Bound on the induced p->p norm of the whole Jacobian over the region, ``[B]``."""
        lower, upper = self._flat()
        rows = self.lipschitz() if math.isinf(self.region.norm) else None
        return lip.induced_norm_bound(lower, upper, self.region.norm, rows)

    def input_lines(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Linear bounds of the Jacobian entries in the input (``method="linear"`` on nets
        with smooth activations; None otherwise): ``(lo_c, lo_X, hi_c, hi_X)`` with
        ``lo_c + lo_X . x <= J[j, k](x) <= hi_c + hi_X . x`` for every x of the region;
        ``*_c: [B, rows, n_in]``, ``*_X: [B, rows, n_in, n_in]`` (input flattened).  Each line
        is at least as tight as the constant bounds once concretised over the region (see
        :func:`rj_plugin.recurjac.input_lines`)."""
        if self.method != "linear" or self._net is None or self._net.linked is None:
            return None
        lower, upper = self._flat()
        return rj.input_lines(self._net, self._backward, self._slack, lower, upper,
                              self._options.get("max_elements", rj.DEFAULT_MAX_ELEMENTS))

    def operator_norm_product(self) -> Tensor:
        """The naive global bound ||W_m[j,:]||_q prod ||W_l||_{p->p} max|sigma'|, ``[rows]``."""
        return lip.operator_norm_product(self._net, self._activation_max, self.region.norm)

    def contains(self, jacobian: Tensor, atol: float = 0.0) -> Tensor:
        """Which Jacobians ``[B, N, n_out, *input_shape]`` lie in the bounds: ``[B, N]``."""
        lo, hi = self.lower[:, None], self.upper[:, None]
        ok = (jacobian >= lo - atol) & (jacobian <= hi + atol)
        return ok.flatten(2).all(-1)


def _check_spec(C, net: rj.JacobianDAG) -> Tensor:
    some = next(iter(net.edges.values()))
    C = torch.as_tensor(C, dtype=some.dtype, device=some.device)
    if C.dim() not in (2, 3) or C.shape[-1] != net.n_out:
        raise InputError(f"C must be [k, {net.n_out}] or [B, k, {net.n_out}], got "
                         f"{tuple(C.shape)}")
    if not torch.isfinite(C).all():
        raise InputError("C contains NaN or inf")
    return C


def _run_algorithm(net: rj.JacobianDAG, region: Region, method: str, preact: str,
                   input_shape: tuple[int, ...], timings: dict[str, float],
                   options: dict[str, Any], activation_max: list[float]) -> JacobianBounds:
    start = time.perf_counter()
    backward = None
    if method in ("recurjac", "linear"):
        backward = rj.recurjac_backward(net, intersect=options.get("intersect", True),
                                        max_elements=options.get("max_elements",
                                                                 rj.DEFAULT_MAX_ELEMENTS),
                                        linear=method == "linear")
        lower, upper = backward.lower[0], backward.upper[0]
    elif method == "fastlip":
        backward = rj.fastlip_backward(net)
        lower, upper = backward.lower[0], backward.upper[0]
    else:
        lower, upper = rj.interval_forward(net)
    slack = rj.rounding_slack(net)  # round outwards: rounding never moves J(x) outside
    lower, upper = lower - slack, upper + slack
    batch = lower.shape[0]
    shape = (batch, lower.shape[1], *input_shape)
    reference = None
    if method == "linear":  # RecurJac's own bounds, computed alongside (never looser than them)
        ref = backward.reference
        reference = JacobianBounds((ref.lower[0] - slack).reshape(shape),
                                   (ref.upper[0] + slack).reshape(shape), region, "recurjac",
                                   preact, {}, net, ref, options, activation_max, slack)
    timings["jacobian_s"] = time.perf_counter() - start
    return JacobianBounds(lower.reshape(shape), upper.reshape(shape), region, method, preact,
                          timings, net, backward, options, activation_max, slack, reference)


def _checked_interval(lower: Tensor, upper: Tensor, act: Any, preact: str, batch: int
                      ) -> tuple[Tensor, Tensor]:
    """Validate the pre-activation interval auto_LiRPA returned for ``act``: ``[B, n]`` each.

    NaN or inf, or lower > upper by more than rounding (a relaxation that excludes the true
    values), is an error naming the node, the activation and the method; a crossing within a few
    hundred ulps of the magnitude (rounding at eps = 0) is replaced by its hull.
    """
    lower, upper = lower.reshape(batch, -1), upper.reshape(batch, -1)
    if not (torch.isfinite(lower).all() and torch.isfinite(upper).all()):
        raise InputError(f"pre-activation bounds of node {act.input_node} ({act.op}) from "
                         f"{preact} are not finite")
    crossing = lower - upper
    if (crossing > 0).any():
        scale = torch.maximum(lower.abs(), upper.abs()) + 1.0
        tolerance = 256 * torch.finfo(lower.dtype).eps * scale
        if (crossing > tolerance).any():
            raise UnsupportedLayerError(
                f"{preact} returned pre-activation bounds with lower > upper (by up to "
                f"{float(crossing.max()):.3g}) at node {act.input_node} before {act.op} "
                f"({act.activation.name}): its relaxation is unsound here; refusing")
        lower, upper = torch.minimum(lower, upper), torch.maximum(lower, upper)
    return lower, upper


def largest_batch(model: nn.Module, example: Tensor) -> int:
    """1 if the traced graph only runs on a batch of one (some ONNX graphs fix the batch size in
    a Reshape), else unlimited."""
    try:
        with torch.no_grad():
            model(example[:1].expand(2, *example.shape[1:]))
    except RuntimeError:
        return 1
    return 1 << 31


def _state_values(module: nn.Module, clone: bool = True) -> list[Tensor]:
    """The module's parameters and buffers (detached; copies when ``clone``), in a fixed order."""
    tensors = [t.detach() for t in itertools.chain(module.parameters(), module.buffers())]
    return [t.clone() for t in tensors] if clone else tensors


class JacobianBounder:
    """A model prepared for repeated Jacobian bounds (graph, chain and linear maps built once).

    Args:
        model: an ``nn.Module`` (the bounder works on an eval-mode copy; the module itself is
            never changed), or a path / demo name understood by :func:`load_model`.
        input_shape: the shape of one input (without batch); needed when the model does not
            record it and no ``example`` is given.
        example: an example input ``[B, *input_shape]`` (used for tracing).
        dtype: float64 (default) or float32.
        device: ``"cpu"``, ``"cuda"``, ...
        bound_opts: extra auto_LiRPA bound options.
    """

    def __init__(self, model: nn.Module | str, *, input_shape: tuple[int, ...] | None = None,
                 example: Tensor | None = None, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", bound_opts: dict | None = None) -> None:
        if dtype not in (torch.float64, torch.float32):
            raise InputError(f"dtype must be float64 or float32, got {dtype}")
        start = time.perf_counter()
        # The caller's module and its parameter / buffer values as built: the graph, the linear
        # maps and auto_LiRPA's module below are snapshots of them (see is_current).
        self._source = model if isinstance(model, nn.Module) else None
        self._source_values = _state_values(model) if isinstance(model, nn.Module) else []
        if isinstance(model, nn.Module):
            # The bounder's own copy, in eval mode and the bounder's dtype / device: the caller's
            # module keeps its mode (a training loop may bound it between steps), dtype, device.
            model = copy.deepcopy(model)
        else:
            model = load_model(model)
        # Nothing trains the bounder's copy: no autograd graphs through its weights.
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.dtype, self.device = dtype, torch.device(device)
        if example is None:
            shape = input_shape or getattr(self.model, "rj_input_shape", None)
            if shape is None:
                raise InputError("the model's input shape is unknown: pass input_shape or "
                                 "an example input")
            example = torch.zeros(1, *shape, dtype=dtype, device=device)
        example = example.to(device=device, dtype=dtype)
        self.input_shape = tuple(example.shape[1:])
        self.graph = LirpaGraph(self.model, example, bound_opts, device)
        self.max_batch = largest_batch(self.graph.module, example)
        self.jacobian_graph: JacobianGraph = build_graph(self.graph.nodes, self.graph.input_name,
                                                         self.graph.output_name)
        self.edges = self.jacobian_graph.edges(dtype, device)
        self.preact_nodes = [a.input_node for a in self.jacobian_graph.activations]
        # Convolutions and pooling are applied as such in RecurJac's sweeps (their dense
        # matrices are mostly zeros); dense layers are applied as matrices.
        structured = {"Conv", "ConvTranspose", "AveragePool"}
        self._push = (self.jacobian_graph.push if any(
            lin.op in structured for lin in self.jacobian_graph.linear_nodes) else None)
        self.build_seconds = time.perf_counter() - start

    def is_current(self) -> bool:
        """Whether the module this bounder was built from still has the parameter and buffer
        values it had then (compared by value; a module given by path never changes).

        The linear maps and auto_LiRPA's graph are taken at build time, so after an in-place
        change of the weights (an optimiser step, ``load_state_dict``) the bounds would be
        those of the old network: build a new bounder then.
        """
        if self._source is None:
            return True
        now = _state_values(self._source, clone=False)
        return len(now) == len(self._source_values) and all(
            (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape) and torch.equal(a, b)
            for a, b in zip(now, self._source_values, strict=True))

    def _require_current(self) -> None:
        if not self.is_current():
            raise InputError("the model's parameters or buffers changed (in place) after this "
                             "JacobianBounder was built, so its linear maps are those of the "
                             "old network; build a new JacobianBounder")

    def derivative_ranges(self, region: Region, preact: str, alpha_iterations: int = 20,
                          alpha_lr: float = 0.1) -> tuple[list[Tensor], list[Tensor]]:
        """``g_lo, g_hi``: one ``[B, n_k]`` pair per activation."""
        self._require_current()
        if region.unbounded:
            pairs = [a.activation.global_bounds(torch.zeros(region.batch, math.prod(a.shape),
                                                            dtype=self.dtype, device=self.device))
                     for a in self.jacobian_graph.activations]
        elif region.batch > self.max_batch:  # e.g. ONNX graphs with a batch size fixed to 1
            parts, checked_parts = [], []
            for b in range(0, region.batch, self.max_batch):
                sub = region.select(slice(b, b + self.max_batch))
                parts.append(self.derivative_ranges(sub, preact, alpha_iterations, alpha_lr))
                last = getattr(self, "_last_preact", None)
                checked_parts.append(last[1] if last is not None and last[0] is sub else None)
            if all(c is not None for c in checked_parts):  # the whole region's intervals
                self._last_preact = (region, {
                    n: (torch.cat([c[n][0] for c in checked_parts]),
                        torch.cat([c[n][1] for c in checked_parts])) for n in checked_parts[0]})
            return ([torch.cat([p[0][k] for p in parts]) for k in range(len(parts[0][0]))],
                    [torch.cat([p[1][k] for p in parts]) for k in range(len(parts[0][1]))])
        else:
            ptb = make_perturbation(region.norm, region.eps, region.lower, region.upper)
            try:
                pre = self.graph.preactivation_bounds(region.center, ptb, self.preact_nodes,
                                                      preact, alpha_iterations, alpha_lr)
            except UnsupportedLayerError:
                if region.batch == 1:
                    raise
                # Some of auto_LiRPA 0.3's rules break on batches (e.g. a broadcast constant
                # before the first layer under CROWN); the inputs one at a time give the same
                # bounds, and a real refusal is raised again for the first input.
                self.max_batch = 1
                return self.derivative_ranges(region, preact, alpha_iterations, alpha_lr)
            pairs = []
            checked = {}
            for act in self.jacobian_graph.activations:
                lo, hi = _checked_interval(*pre[act.input_node], act, preact, region.batch)
                checked[act.input_node] = (lo, hi)
                pairs.append(act.activation.bounds(lo, hi))
            # The checked intervals of this region, for the linear method's lines (same call).
            self._last_preact = (region, checked)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def bound(self, region: Region, *, preact: str = "crown", method: str = "recurjac",
              C: Tensor | None = None, alpha_iterations: int = 20, alpha_lr: float = 0.1,
              intersect: bool = True, max_elements: int = rj.DEFAULT_MAX_ELEMENTS
              ) -> JacobianBounds:
        """Certified Jacobian bounds over ``region`` (see :func:`bound_jacobian`)."""
        try:
            iters = None if isinstance(alpha_iterations, bool) else alpha_iterations.__index__()
        except (AttributeError, TypeError):
            iters = None
        if iters is None or iters < 1:
            raise InputError(f"alpha_iterations must be an integer >= 1, got "
                             f"{alpha_iterations!r}")
        try:
            lr = math.nan if isinstance(alpha_lr, bool) else float(alpha_lr)
        except (TypeError, ValueError):
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise InputError(f"alpha_lr must be a finite number > 0, got {alpha_lr!r}")
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if preact not in PREACT_METHODS:
            raise InputError(f"unknown pre-activation method {preact!r}; choose from "
                             f"{', '.join(PREACT_METHODS)}")
        if tuple(region.center.shape[1:]) != self.input_shape:
            raise InputError(f"input has shape {tuple(region.center.shape[1:])}; the model "
                             f"takes {self.input_shape}")
        self._require_current()
        start = time.perf_counter()
        g_lo, g_hi = self.derivative_ranges(region, preact, alpha_iterations, alpha_lr)
        timings = {"preact_s": time.perf_counter() - start}
        linked = None
        if method == "linear" and not region.unbounded:
            start = time.perf_counter()
            linked = self._linked_preactivations(region)
            timings["linked_s"] = time.perf_counter() - start
        net = rj.JacobianDAG(dict(self.edges), g_lo, g_hi, self._push, linked)
        if C is not None:
            net = net.with_spec(_check_spec(C, net))
        options = {"intersect": intersect, "max_elements": max_elements}
        act_max = [a.activation.max_abs_derivative for a in self.jacobian_graph.activations]
        return _run_algorithm(net, region, method, "none" if region.unbounded else preact,
                              self.input_shape, timings, options, act_max)

    def _linked_preactivations(self, region: Region) -> rj.LinkedPreactivations | None:
        """CROWN's lines of the smooth activations' pre-activations in the input, and lines of
        their derivatives, for the ``linear`` method (None when no activation is smooth or the
        last pre-activation bounds were not computed for this region in one piece)."""
        acts = [(t, a) for t, a in enumerate(self.jacobian_graph.activations, start=1)
                if a.activation.linear_derivative]
        last = getattr(self, "_last_preact", None)
        if not acts or last is None or last[0] is not region:
            return None
        pre = last[1]
        which = [a.input_node for _, a in acts]

        def lines_of(rows: slice) -> dict[str, tuple[Tensor, ...]]:
            sub = region.select(rows)

            def extremes(coef: Tensor) -> tuple[Tensor, Tensor]:
                return -sub.support(-coef), sub.support(coef)

            ptb = make_perturbation(sub.norm, sub.eps, sub.lower, sub.upper)
            return self.graph.preactivation_linear_bounds(
                sub.center, ptb, self.preact_nodes,
                {n: (lo[rows].reshape(-1, *self.graph.module[n].output_shape[1:]),
                     hi[rows].reshape(-1, *self.graph.module[n].output_shape[1:]))
                 for n, (lo, hi) in pre.items()}, which, extremes)

        try:
            lines = lines_of(slice(0, region.batch))
        except UnsupportedLayerError:
            if region.batch == 1:
                raise
            # auto_LiRPA 0.3's CROWN breaks on batches of some graphs (e.g. normalisation
            # buffers before the first layer); one input at a time gives the same lines
            parts = [lines_of(slice(b, b + 1)) for b in range(region.batch)]
            lines = {n: tuple(torch.cat([p[n][k] for p in parts]) for k in range(4))
                     for n in parts[0] if all(n in p for p in parts)}
        nodes = {}
        for t, act in acts:
            if act.input_node not in lines:
                continue
            lo, hi = pre[act.input_node]
            nodes[t] = (*lines[act.input_node], *act.activation.linear_derivative_bounds(lo, hi))
        forward = self._forward_lines(region, pre, max(nodes)) if nodes else None
        return rj.LinkedPreactivations(nodes, region.support, region.magnitude(), forward)

    def _forward_lines(self, region: Region, pre: dict[str, tuple[Tensor, Tensor]], last: int
                       ) -> rj.ForwardLines | None:
        """The network around its value at the region's centre, activations 1..``last``
        (see :class:`~rj_plugin.recurjac.ForwardLines`); None where one of them has no lines."""
        acts = self.jacobian_graph.activations[:last]
        if not all(a.activation.has_linear_relaxation for a in acts):
            return None
        module, batch = self.graph.module, region.batch
        shapes = {name: act.shape for act in acts for name in (act.input_node, act.node)}
        values: dict[str, list[Tensor]] = {name: [] for name in shapes}  # once per node: two
        for b in range(0, batch, self.max_batch):  # activations may read the same one
            with torch.no_grad():  # (in chunks: graphs with a fixed batch size of 1, too)
                module(region.center[b:b + self.max_batch])
            for name, shape in shapes.items():
                values[name].append(module[name].forward_value.detach().reshape(-1, *shape))
        x_center = region.center.reshape(batch, -1)
        # |dh_s| bounds: |x - x_c| <= |x| + |x_c|, and |dh_t| <= sup|sigma_t'| |dz_t|; the
        # rounding margin also covers the centre's own values (|h_c|, |z_c|): the computed
        # z_c and h_c satisfy z_c = sum_s A h_c + b only up to rounding of that size
        h_spread = {0: region.magnitude() + 2 * x_center.abs()}
        z_center, lines, z_spread, reach = {}, {}, {}, {}
        for t, act in enumerate(acts, start=1):
            lo, hi = pre[act.input_node]
            zc = torch.cat(values[act.input_node]).reshape(batch, -1)
            hc = torch.cat(values[act.node]).reshape(batch, -1)
            a_lo, c_lo, a_hi, c_hi = act.activation.linear_relaxation(lo, hi)
            lines[t] = (a_lo, a_lo * zc + c_lo - hc, a_hi, a_hi * zc + c_hi - hc)
            z_center[t] = zc
            z_spread[t] = torch.maximum(hi - zc, zc - lo).clamp(min=0)
            h_spread[t] = act.activation.max_abs_derivative * z_spread[t] + hc.abs()
            reach[t] = sum((h_spread[s] @ a.abs().T for (s, u), a in self.edges.items()
                            if u == t), zc.abs())
        return rj.ForwardLines(x_center, z_center, lines, z_spread, reach)

    def region(self, x0=None, eps=None, norm="inf", lower=None, upper=None,
               unbounded: bool = False) -> Region:
        """A validated :class:`Region` for this model's input shape, dtype and device."""
        return make_region(x0, eps, norm, lower, upper, unbounded=unbounded,
                           input_shape=self.input_shape, dtype=self.dtype, device=self.device)


def as_bounder(model: nn.Module | str | JacobianBounder, x0=None, lower=None
               ) -> JacobianBounder:
    """``model`` itself when it is a :class:`JacobianBounder`, else one built for it (the input
    shape from the model, or read off ``x0`` / ``lower`` as a batch unless 1-d)."""
    if isinstance(model, JacobianBounder):
        return model
    ref = x0 if x0 is not None else lower
    shape = getattr(model, "rj_input_shape", None)
    if shape is None and ref is not None:
        ref = torch.as_tensor(ref)
        shape = tuple(ref.shape[1:]) if ref.dim() >= 2 else tuple(ref.shape)
    return JacobianBounder(model, input_shape=shape)


def bound_jacobian(model: nn.Module | str, x0=None, eps=None, norm="inf", *, lower=None,
                   upper=None, preact: str = "crown", method: str = "recurjac",
                   C: Tensor | None = None, global_bounds: bool = False,
                   dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                   alpha_iterations: int = 20, alpha_lr: float = 0.1,
                   bound_opts: dict | None = None, intersect: bool = True) -> JacobianBounds:
    """Certified element-wise bounds of d f / d x over an input region.

    Args:
        model: an ``nn.Module`` (batch-first), a ``.onnx`` / ``.pt`` path, or a demo name.
        x0: the center, ``[*input_shape]`` or ``[B, *input_shape]``.  When the model does not
            record its input shape (ONNX and demo models do), x0 is read as a batch
            ``[B, *input_shape]`` unless it is 1-d.
        eps, norm: the l_p ball ``||x - x0||_p <= eps``, p in {1, 2, inf}.
        lower, upper: a box instead of a ball.
        preact: pre-activation bounds from auto_LiRPA: ``ibp`` | ``crown`` | ``crown-ibp`` |
            ``alpha-crown``.
        method: ``recurjac`` (the default), ``linear`` (linear relaxations of the backward pass,
            intersected with RecurJac: tighter, 2-4x the time), ``fastlip`` or ``interval``.
        C: ``[k, n_out]`` or ``[B, k, n_out]``: bound the Jacobian of ``C @ f`` instead.
        global_bounds: bound over the whole input space (x0 gives only the shape).
        dtype, device: float64 by default; float32 opt-in; any torch device.

    Returns:
        :class:`JacobianBounds` with ``lower, upper`` of shape ``[B, n_out, *input_shape]``.
    """
    net = model if isinstance(model, nn.Module) else load_model(model, dtype=dtype, device=device)
    shape = getattr(net, "rj_input_shape", None)
    if shape is None:  # x0 (or the box) is a batch [B, *input_shape], or one 1-d input
        ref = x0 if x0 is not None else lower
        if ref is None:
            raise InputError("no region: give x0 and eps, or lower and upper")
        ref = torch.as_tensor(ref)
        shape = tuple(ref.shape[1:]) if ref.dim() >= 2 else tuple(ref.shape)
    bounder = JacobianBounder(net, input_shape=tuple(shape), dtype=dtype, device=device,
                              bound_opts=bound_opts)
    region = bounder.region(x0, eps, norm, lower, upper, unbounded=global_bounds)
    return bounder.bound(region, preact=preact, method=method, C=C,
                         alpha_iterations=alpha_iterations, alpha_lr=alpha_lr,
                         intersect=intersect)
