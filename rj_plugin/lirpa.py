"""The one module that talks to auto_LiRPA internals.

It builds a ``BoundedModule`` for a network, describes its graph as plain :class:`GraphNode`
records (operator type, inputs, constant values, attributes, shapes) for
:mod:`rj_plugin.chain`, and computes the pre-activation bounds that RecurJac consumes with one of
auto_LiRPA's methods:

* ``ibp``: interval bound propagation;
* ``crown``: CROWN back-substitution for every pre-activation node, with auto_LiRPA's sparse
  mode switched off so that *every* neuron gets its CROWN value (0.3's sparse mode keeps the looser
  IBP value for neurons IBP already calls stable, which is harmless for ReLU but not for tanh or
  sigmoid, whose derivative range depends on the magnitudes);
* ``crown-ibp``: IBP for all layers, then CROWN back-substitution for each pre-activation node on
  top of the IBP bounds of the layers before it (the intersection with IBP is kept);
* ``alpha-crown``: CROWN, then for each pre-activation node in order an alpha-CROWN optimisation
  of that node's bounds with the already tightened earlier layers fixed; the result is
  intersected with CROWN, so it is never looser.

Version differences (0.3 vs 0.4-0.7) are confined to the small helpers below: the keyword for
fixed intermediate bounds (``intermediate_layer_bounds`` vs ``interm_bounds``), ``lower`` as an
attribute vs a cached property, and class names (``BoundLeakyRelu`` may subclass ``BoundRelu``;
dispatch is on the exact class name).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rj_plugin import compat
from rj_plugin.errors import InputError, RJError, UnsupportedLayerError

auto_LiRPA = compat.import_auto_lirpa()
from auto_LiRPA import BoundedModule, BoundedTensor  # noqa: E402
from auto_LiRPA.perturbations import PerturbationLpNorm  # noqa: E402

PREACT_METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")

# Attributes that the chain builders read, copied off the auto_LiRPA node when present.
_ATTRS = ("transA", "transB", "alpha", "beta", "axis", "perm", "stride", "padding", "dilation",
          "groups", "epsilon", "training", "kernel_shape", "ceil_mode", "count_include_pad",
          "output_padding")


@dataclass
class GraphNode:
    """A version-independent description of one node of auto_LiRPA's graph.

    Attributes:
        name: the node's name in the BoundedModule.
        op: the operator, e.g. ``"Linear"``, ``"Relu"`` (the class name without ``Bound``).
        inputs: names of the input nodes, in order.
        value: the node's value when it does not depend on the perturbed input (weights, biases,
            constants, shapes), else None.
        output_shape: the shape of the node's output for the example input (batch first).
        attrs: operator attributes (see ``_ATTRS``).
    """

    name: str
    op: str
    inputs: list[str]
    value: Tensor | None
    output_shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


class _UnsupportedOps(logging.Handler):
    """Collects the nodes auto_LiRPA logs as unsupported while it parses a model."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.nodes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        node = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if "unsupported operation" in str(record.msg) and hasattr(node, "op"):
            op = node.op.split("::")[-1]
            if op == "ATen":  # a torch op with no ONNX equivalent: name the torch op
                op = f"aten::{(getattr(node, 'attr', None) or {}).get('operator', '?')}"
            self.nodes.append(f"{node.name} (op {op})")


_LIRPA_DIR = os.path.dirname(os.path.abspath(auto_LiRPA.__file__))
# Exceptions that auto_LiRPA 0.3 raises for graphs it cannot handle (asserts on shapes, missing
# rules, signature mismatches with today's torch): each is reported as an unsupported node.
_LIRPA_FAILURES = (AssertionError, AttributeError, IndexError, KeyError, NotImplementedError,
                   TypeError, ValueError, RuntimeError)


def _failing_node(tb: Any) -> str | None:
    """``"node NAME (op OP)"`` for the innermost auto_LiRPA operator on a traceback: a ``Bound``
    instance that has its name, or the graph node being converted into one; else None."""
    where = None
    while tb is not None:
        local = tb.tb_frame.f_locals
        bound = [c for c in (local.get("node"), local.get("self"))
                 if isinstance(c, auto_LiRPA.operators.Bound) and getattr(c, "name", None)]
        if bound:
            where = (f"node {bound[-1].name} "
                     f"(op {type(bound[-1]).__name__.removeprefix('Bound')})")
        elif "nodesOP" in local and isinstance(local.get("n"), int):  # BoundedModule._convert
            try:
                parsed = local["nodesOP"][local["n"]]
                where = f"node {parsed.name} (op {str(parsed.op).split('::')[-1]})"
            except (IndexError, AttributeError, TypeError):
                pass
        tb = tb.tb_next
    return where


def _raised_in_lirpa(tb: Any) -> bool:
    """True when a traceback passes through auto_LiRPA's code (the error arose there or in what
    it called, torch included), not only through the plugin's."""
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_LIRPA_DIR):
            return True
        tb = tb.tb_next
    return False


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or \
        "out of memory" in text.lower()


@contextlib.contextmanager
def lirpa_errors(what: str) -> Iterator[None]:
    """Translate auto_LiRPA's internal failures during ``what`` into plugin errors.

    An exception raised inside auto_LiRPA's own code (an assert on a shape it does not handle, a
    missing bound rule, a signature mismatch with today's torch) becomes an
    :class:`UnsupportedLayerError` that names the operator node it happened in and its op; an
    allocation failure becomes an :class:`InputError` that says so.  Anything raised elsewhere
    (the plugin's own bugs included) passes through unchanged.
    """
    try:
        yield
    except (MemoryError, *_LIRPA_FAILURES) as exc:
        if isinstance(exc, RJError):
            raise
        if _is_out_of_memory(exc):
            raise InputError(f"out of memory during {what}: {' '.join(str(exc).split())[:200]}; "
                             "use preact='crown' or 'ibp', a smaller batch, or float32") from None
        if not _raised_in_lirpa(exc.__traceback__):
            raise
        where = _failing_node(exc.__traceback__) or "this model"
        detail = " ".join(str(exc).split())[:200] or "(no message)"
        raise UnsupportedLayerError(f"auto_LiRPA {getattr(auto_LiRPA, '__version__', '')} cannot "
                                    f"handle {where} during {what}: {type(exc).__name__}: "
                                    f"{detail}") from None


def _same_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """Explicit symmetric padding equal to ``padding='same'`` (None when 'same' would pad one
    side more than the other: an even total)."""
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


class _Unflatten(nn.Module):
    """``nn.Unflatten(1, shape)`` as a reshape (0.3 cannot parse ``aten::unflatten``)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape, *x.shape[2:])


class _Conv1dAs2d(nn.Module):
    """``nn.Conv1d`` / ``nn.AvgPool1d`` computed by their 2-d versions on a height-1 image
    (0.3's Conv and AveragePool read exactly two spatial dimensions)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @classmethod
    def of(cls, layer: nn.Module) -> _Conv1dAs2d:
        if isinstance(layer, nn.AvgPool1d):
            pad = layer.padding[0] if isinstance(layer.padding, tuple) else layer.padding
            return cls(nn.AvgPool2d((1, layer.kernel_size[0]), (1, layer.stride[0]), (0, pad),
                                    layer.ceil_mode, layer.count_include_pad))
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, (1, layer.kernel_size[0]),
                         (1, layer.stride[0]), (0, _explicit_padding(layer)[0]),
                         (1, layer.dilation[0]),
                         layer.groups, layer.bias is not None, device=layer.weight.device,
                         dtype=layer.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(layer.weight.unsqueeze(2))
            if layer.bias is not None:
                conv.bias.copy_(layer.bias)
        return cls(conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.unsqueeze(2)).squeeze(2)


def _is_plain_1d(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv1d):
        return m.padding_mode == "zeros" and (not isinstance(m.padding, str)
                                              or _explicit_padding(m) is not None)
    return isinstance(m, nn.AvgPool1d)


def _explicit_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """A convolution's padding as integers ('valid', and 'same' where it is symmetric)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    return (0,) * len(conv.kernel_size) if conv.padding == "valid" else _same_padding(conv)


def traceable(model: nn.Module) -> nn.Module:
    """The same function with modules auto_LiRPA 0.3 cannot trace replaced by equivalents.

    * eval-mode dropout (the identity) -> ``nn.Identity`` (0.3 only parses training dropout);
    * ``BatchNorm(affine=False)`` -> affine with weight 1 and bias 0 (0.3's CROWN rule reads the
      affine parameters);
    * ``Conv(padding='valid' | 'same')`` -> the explicit integer padding (0.3 reads ``pads``),
      where 'same' pads both sides equally;
    * ``nn.Unflatten(1, shape)`` -> a reshape (0.3 cannot parse ``aten::unflatten``);
    * ``nn.Conv1d`` (zero padding) and ``nn.AvgPool1d`` -> their 2-d versions on a height-1
      image (0.3 handles only 2-d convolution and pooling).

    Returns ``model`` itself when nothing needs replacing, else a rewritten deep copy (the
    caller's module is never changed).
    """
    def needs(m: nn.Module) -> bool:
        return (isinstance(m, nn.modules.dropout._DropoutNd)
                or (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine)
                or (isinstance(m, nn.modules.conv._ConvNd) and isinstance(m.padding, str))
                or (isinstance(m, nn.Unflatten) and m.dim == 1) or _is_plain_1d(m))

    for name, m in model.named_modules():
        if isinstance(m, nn.Softplus) and float(m.threshold) != 20.0:
            raise UnsupportedLayerError(
                f"module {name or 'model'} (Softplus) has threshold={m.threshold}: tracing "
                "records ONNX's Softplus, which has no threshold, so only torch's default of "
                "20 is supported")
    if not any(needs(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.dropout._DropoutNd) and not child.training:
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not child.affine:
                ref = child.running_mean if child.running_mean is not None else None
                opts = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
                child.weight = nn.Parameter(torch.ones(child.num_features, **opts))
                child.bias = nn.Parameter(torch.zeros(child.num_features, **opts))
                child.affine = True
            elif _is_plain_1d(child):
                setattr(parent, name, _Conv1dAs2d.of(child))
            elif isinstance(child, nn.Unflatten) and child.dim == 1:
                setattr(parent, name, _Unflatten(tuple(child.unflattened_size)))
            elif isinstance(child, nn.modules.conv._ConvNd) and isinstance(child.padding, str):
                pads = (0,) * len(child.kernel_size) if child.padding == "valid" else \
                    _same_padding(child)
                if pads is not None:
                    child.padding = pads
                    child._reversed_padding_repeated_twice = [p for p in reversed(pads)
                                                              for _ in range(2)]
    return model


def check_traced_function(model: nn.Module, module: Any, example: Tensor) -> None:
    """Refuse a traced graph that computes another function than the model.

    Tracing can drop an operator option silently (e.g. ``AvgPool2d(divisor_override=...)``
    exports as a plain average), and every bound would then be of the wrong network.  The
    outputs of the model and of auto_LiRPA's graph are compared at the example and at a random
    point near it.

    Raises:
        UnsupportedLayerError: when they differ by more than rounding.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.rand(example.shape, generator=gen, dtype=example.dtype).to(example.device)
    tol = 1e-7 if example.dtype == torch.float64 else 1e-3
    with torch.no_grad():
        for x in (example + noise, example):  # the example last: its values stay cached
            expected, traced = model(x), module(x)
            if not isinstance(expected, Tensor) or expected.shape != traced.shape:
                raise UnsupportedLayerError(
                    "auto_LiRPA's traced graph returns another shape than the model "
                    f"({tuple(getattr(traced, 'shape', ()))} vs "
                    f"{tuple(getattr(expected, 'shape', ()))})")
            gap = float((expected - traced).abs().max())
            scale = 1.0 + float(expected.abs().max())
            if not gap <= tol * scale:
                raise UnsupportedLayerError(
                    f"auto_LiRPA's traced graph computes another function than the model (outputs "
                    f"differ by {gap:.3g}): an operator option was lost in tracing (e.g. "
                    "AvgPool2d's divisor_override); refusing rather than bounding another net")


def _build_bounded_module(model: nn.Module, example: Tensor, opts: dict,
                          device: torch.device) -> Any:
    """``BoundedModule(model, example)``; an operator auto_LiRPA cannot parse becomes an
    :class:`UnsupportedLayerError` naming the node(s) and op(s) (auto_LiRPA only logs them)."""
    handler = _UnsupportedOps()
    logger = logging.getLogger("auto_LiRPA")
    logger.addHandler(handler)
    try:
        with lirpa_errors("graph construction"):
            try:
                return BoundedModule(model, example, bound_opts=opts, device=device)
            except NotImplementedError as exc:
                if not handler.nodes:
                    raise
                raise UnsupportedLayerError(
                    f"auto_LiRPA cannot bound this model: unsupported node(s) "
                    f"{', '.join(handler.nodes)}") from exc
    finally:
        logger.removeHandler(handler)


def _kwarg_for_fixed_bounds() -> str:
    params = inspect.signature(BoundedModule.compute_bounds).parameters
    return "interm_bounds" if "interm_bounds" in params else "intermediate_layer_bounds"


_FIXED_BOUNDS_KW = _kwarg_for_fixed_bounds()

# auto_LiRPA keeps a lower and an upper coefficient tensor per traversed node, plus temporaries of
# the same size while it multiplies them through an operator.
_COPIES_PER_NODE = 3


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def default_memory_budget() -> int:
    """Bytes the coefficient tensors of one back-substitution may take: a quarter of the memory
    available now, between 256 MiB and 1 GiB (``RJ_MEMORY_BUDGET`` in bytes overrides it)."""
    override = os.environ.get("RJ_MEMORY_BUDGET")
    if override:
        return int(float(override))
    available = 8 << 30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(min(1 << 30, max(256 << 20, available // 4)))


def _node_bounds(node: Any) -> tuple[Tensor, Tensor] | None:
    """A node's (lower, upper) if auto_LiRPA computed them, else None."""
    lower, upper = getattr(node, "lower", None), getattr(node, "upper", None)
    if lower is None or upper is None:
        interval = getattr(node, "interval", None)
        if interval is None:
            return None
        lower, upper = interval[0], interval[1]
    if not isinstance(lower, Tensor) or not isinstance(upper, Tensor):
        return None
    return lower.detach(), upper.detach()


def _intersect(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The intersection of two sound interval bounds of the same node."""
    return torch.maximum(a[0], b[0].reshape(a[0].shape)), torch.minimum(a[1],
                                                                        b[1].reshape(a[1].shape))


def make_perturbation(norm: float, eps: float | None = None, lower: Tensor | None = None,
                      upper: Tensor | None = None) -> Any:
    """An auto_LiRPA Lp-ball perturbation (``eps`` around the center) or box (``lower, upper``)."""
    if lower is not None:
        return PerturbationLpNorm(norm=float("inf"), eps=None, x_L=lower, x_U=upper)
    return PerturbationLpNorm(norm=norm, eps=eps)


class LirpaGraph:
    """A network wrapped in auto_LiRPA's ``BoundedModule``.

    Args:
        model: the network, batch-first, in eval mode.
        example: an input ``[B, *input_shape]`` on the model's device and dtype (its batch size is
            only used for tracing).
        bound_opts: extra auto_LiRPA bound options, merged over the plugin's defaults.
    """

    def __init__(self, model: nn.Module, example: Tensor, bound_opts: dict | None = None,
                 device: torch.device | str = "cpu") -> None:
        opts = compat.default_bound_opts()
        opts["sparse_intermediate_bounds"] = False  # CROWN values for every neuron
        for key, val in (bound_opts or {}).items():
            if isinstance(val, dict) and isinstance(opts.get(key), dict):
                opts[key] = {**opts[key], **val}
            else:
                opts[key] = val
        self.bound_opts = opts
        self.device = torch.device(device)
        self.dtype = example.dtype
        self.module = _build_bounded_module(traceable(model), example, opts, self.device)
        self.module.eval()
        check_traced_function(model, self.module, example)
        self.nodes = [self._describe(n) for n in self.module._modules.values()]
        self.input_name = self._input_node_name()
        self.output_name = self.module.final_name
        self.memory_budget = default_memory_budget()
        # Elements per batch entry of every input-dependent node up to each node (topological):
        # the coefficient tensors of a back-substitution from that node span these nodes.
        self._traversed: dict[str, int] = {}
        total = 0
        for node in self.module._modules.values():
            shape = getattr(node, "output_shape", None)
            if getattr(node, "perturbed", False) and shape is not None and len(shape) > 1:
                total += math.prod(shape[1:])
            self._traversed[node.name] = total

    # -- graph description ------------------------------------------------------------------

    def _input_node_name(self) -> str:
        names = [n for n in self.module.root_name
                 if type(self.module[n]).__name__ == "BoundInput"]
        if len(names) != 1:
            raise UnsupportedLayerError(f"expected one input node, found {names}")
        return names[0]

    def _describe(self, node: Any) -> GraphNode:
        op = type(node).__name__.removeprefix("Bound")
        value = None
        if not getattr(node, "perturbed", True) or op in ("Params", "Buffers", "Constant"):
            value = getattr(node, "forward_value", None)
            if value is None:
                value = getattr(node, "value", None)
            if isinstance(value, nn.Parameter):
                value = value.detach()
        out = getattr(node, "output_shape", None)
        if out is None and isinstance(getattr(node, "forward_value", None), Tensor):
            out = node.forward_value.shape
        attrs = {a: getattr(node, a) for a in _ATTRS if hasattr(node, a)}
        attrs.update({k: v for k, v in (getattr(node, "attr", None) or {}).items()
                      if k not in attrs})
        return GraphNode(node.name, op, [i.name for i in node.inputs], value,
                         tuple(out) if out is not None else (), attrs)

    # -- bounds -------------------------------------------------------------------------------

    def _bounded_input(self, center: Tensor, perturbation: Any) -> BoundedTensor:
        return BoundedTensor(center.to(self.device, self.dtype), perturbation)

    def _read(self, names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for name in names:
            b = _node_bounds(self.module[name])
            if b is None:
                raise RuntimeError(f"auto_LiRPA computed no bounds for node {name}")
            out[name] = b
        return out

    def preactivation_bounds(self, center: Tensor, perturbation: Any, names: list[str],
                             method: str = "crown", alpha_iterations: int = 20,
                             alpha_lr: float = 0.1) -> dict[str, tuple[Tensor, Tensor]]:
        """Bounds ``(lower, upper)`` of the nodes ``names`` (pre-activation nodes, in
        topological order) over the region, each ``[B, *node_shape]``.

        Args:
            center: ``[B, *input_shape]``: the region's center (box: any point inside it).
            perturbation: from :func:`make_perturbation`.
            method: one of ``PREACT_METHODS``.
        """
        if method not in PREACT_METHODS:
            raise InputError(f"unknown pre-activation method {method!r}; "
                             f"choose from {', '.join(PREACT_METHODS)}")
        if not names:
            return {}
        x = self._bounded_input(center, perturbation)
        # IBP over the whole graph (the output is the one node every activation reaches): up to
        # the last pre-activation only, a parallel branch (relu(z + 1) - relu(z - 1)) is missed
        with torch.no_grad(), lirpa_errors("IBP"):
            self.module.compute_bounds(x=(x,), method="IBP")
        ibp = self._read(names)
        if method == "ibp":
            return ibp
        if method == "crown-ibp":
            result = {}
            for name in names:
                with torch.no_grad():
                    lb, ub = self._bound_node(x, name, "CROWN-IBP")
                result[name] = _intersect((lb, ub), ibp[name])
            return result
        if self._crown_fits(names, x.shape[0]):
            # CROWN for the whole graph leaves every pre-activation bound
            with torch.no_grad(), lirpa_errors("CROWN"):
                self.module.compute_bounds(x=(x,), method="CROWN")
            crown = {n: _intersect(b, ibp[n]) for n, b in self._read(names).items()}
        else:
            crown = self._crown_per_node(x, names, ibp)
        if method == "crown":
            return crown
        return self._alpha_crown(x, names, crown, alpha_iterations, alpha_lr)

    def _node_size(self, name: str) -> int:
        return math.prod(self.module[name].output_shape[1:])

    def _bytes_per_row(self, name: str, batch: int) -> int:
        """Estimated bytes of one specification row of a back-substitution from ``name``."""
        itemsize = torch.finfo(self.dtype).bits // 8
        return batch * _COPIES_PER_NODE * itemsize * (self._traversed[name] +
                                                     self._node_size(name))

    def rows_per_call(self, name: str, batch: int, method: str) -> int:
        """How many of the node's neurons one back-substitution may bound within the memory
        budget (all of them when they fit).

        Raises:
            InputError: when not even one row fits, naming the node, the estimate and the option.
        """
        per_row = self._bytes_per_row(name, batch)
        if per_row > self.memory_budget:
            raise InputError(
                f"{method} bounds of node {name} need about {_format_bytes(per_row)} per "
                f"neuron, over the memory budget of {_format_bytes(self.memory_budget)} "
                "(RJ_MEMORY_BUDGET); use preact='ibp' or a smaller batch")
        return max(1, min(self._node_size(name), self.memory_budget // per_row))

    def _bound_node(self, x: BoundedTensor, name: str, method: str, **kwargs: Any
                    ) -> tuple[Tensor, Tensor]:
        """Bounds of one node by ``method`` with that node as the final node, ``[B, *shape]``.

        The specification is the identity shaped like the node (0.3 does not reshape a flat C
        for convolutional nodes), one block of rows at a time so that the coefficient tensors
        stay within :attr:`memory_budget` (:meth:`rows_per_call`).
        """
        node = self.module[name]
        shape = tuple(node.output_shape[1:])
        n, batch = math.prod(shape), x.shape[0]
        rows = self.rows_per_call(name, batch, method)
        lower, upper = [], []
        for start in range(0, n, rows):
            k = min(rows, n - start)
            spec = torch.zeros(k, n, dtype=self.dtype, device=self.device)
            spec[:, start:start + k] = torch.eye(k, dtype=self.dtype, device=self.device)
            spec = spec.reshape(1, k, *shape).expand(batch, k, *shape)
            with lirpa_errors(method):
                lb, ub = self.module.compute_bounds(x=(x,), C=spec, method=method,
                                                    final_node_name=name, **kwargs)
            lower.append(lb.detach().reshape(batch, k))
            upper.append(ub.detach().reshape(batch, k))
        return (torch.cat(lower, 1).reshape(batch, *shape),
                torch.cat(upper, 1).reshape(batch, *shape))

    def preactivation_linear_bounds(self, center: Tensor, perturbation: Any, names: list[str],
                                    fixed: dict[str, tuple[Tensor, Tensor]], which: list[str],
                                    extremes: Callable[[Tensor], tuple[Tensor, Tensor]]
                                    ) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """CROWN's linear bounds of the pre-activation nodes ``which`` in the input (the nodes
        for which auto_LiRPA returns none are left out of the result):
        ``name -> (lA, lbias, uA, ubias)`` with ``lA, uA: [B, n_node, n_in]`` and biases
        ``[B, n_node]`` such that  lA x + lbias <= z(x) <= uA x + ubias  for every x of the
        region.

        The relaxations of the earlier activations use the bounds ``fixed`` (``names`` in
        topological order, e.g. alpha-CROWN's), which hold over the region, so the lines do too.

        The offsets are not taken from auto_LiRPA's A dictionary: in 0.3 they miss the constants
        of some ops before the first layer (e.g. ``(x - mean) / std``; measured: lines off by
        0.3).  They are recomputed from the concretised bounds of the same call, which are
        right:  lbias = lb - min_{x in R} lA x  with ``extremes(A) -> (min, max)`` of A x over
        the region R (``[B, k]`` each).  Since auto_LiRPA's lb is the line's minimum over a set
        that contains R (or lower), the line moves down, never up: it stays below z.
        """
        x = self._bounded_input(center, perturbation)
        batch = x.shape[0]
        result = {}
        for k, name in enumerate(names):
            if name not in which:
                continue
            n = self._node_size(name)
            if name == self.input_name:  # z = x itself
                eye = torch.eye(n, dtype=self.dtype, device=self.device).expand(batch, n, n)
                zero = torch.zeros(batch, n, dtype=self.dtype, device=self.device)
                result[name] = (eye, zero, eye, zero)
                continue
            earlier = {n: [fixed[n][0], fixed[n][1]] for n in names[:k]}
            shape = tuple(self.module[name].output_shape[1:])
            rows = self.rows_per_call(name, batch, "CROWN")
            parts: list[list[Tensor]] = [[], [], [], []]
            for start in range(0, n, rows):
                k_rows = min(rows, n - start)
                spec = torch.zeros(k_rows, n, dtype=self.dtype, device=self.device)
                spec[:, start:start + k_rows] = torch.eye(k_rows, dtype=self.dtype,
                                                          device=self.device)
                spec = spec.reshape(1, k_rows, *shape).expand(batch, k_rows, *shape)
                with torch.no_grad(), lirpa_errors("CROWN"):
                    lb, ub, a_dict = self.module.compute_bounds(
                        x=(x,), C=spec, method="CROWN", final_node_name=name, return_A=True,
                        needed_A_dict={name: [self.input_name]}, **{_FIXED_BOUNDS_KW: earlier})
                entry = a_dict.get(name, {}).get(self.input_name) or {}
                if entry.get("lA") is None or entry.get("uA") is None:
                    break  # auto_LiRPA gave no lines for this node: it is left out
                l_a = entry["lA"].detach().reshape(batch, k_rows, -1)
                u_a = entry["uA"].detach().reshape(batch, k_rows, -1)
                low, high = extremes(l_a)[0], extremes(u_a)[1]
                parts[0].append(l_a)
                parts[1].append(lb.detach().reshape(batch, k_rows) - low)
                parts[2].append(u_a)
                parts[3].append(ub.detach().reshape(batch, k_rows) - high)
            else:
                result[name] = tuple(torch.cat(p, 1) for p in parts)
        return result

    def _crown_fits(self, names: list[str], batch: int) -> bool:
        """Whether one CROWN pass over the whole graph (every node's full identity
        specification at once) fits the memory budget."""
        return all(self._bytes_per_row(n, batch) * self._node_size(n) <= self.memory_budget
                   for n in names)

    def _crown_per_node(self, x: BoundedTensor, names: list[str],
                        ibp: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """CROWN for each pre-activation node in order, in blocks of rows, with the earlier
        nodes' CROWN bounds fixed: the bounds of the whole-graph pass, within the budget."""
        result: dict[str, tuple[Tensor, Tensor]] = {}
        for k, name in enumerate(names):
            fixed = {n: [result[n][0], result[n][1]] for n in names[:k]}
            with torch.no_grad():
                bounds = self._bound_node(x, name, "CROWN", **{_FIXED_BOUNDS_KW: fixed})
            result[name] = _intersect(bounds, ibp[name])
        return result

    def _ancestors(self, name: str) -> set[str]:
        """Names of the nodes ``name`` depends on (not itself)."""
        seen: set[str] = set()
        stack = [i.name for i in self.module[name].inputs]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(i.name for i in self.module[node].inputs)
        return seen

    def _alpha_crown(self, x: BoundedTensor, names: list[str],
                     crown: dict[str, tuple[Tensor, Tensor]], iterations: int, lr: float
                     ) -> dict[str, tuple[Tensor, Tensor]]:
        """alpha-CROWN for each pre-activation node in order, earlier layers fixed.

        Without any optimisable activation in the graph (e.g. only leaky ReLU in auto_LiRPA 0.3)
        there is nothing to optimise and the result is the CROWN bounds.
        """
        if not getattr(self.module, "optimizable_activations", None):
            return crown
        opt = self.module.bound_opts.setdefault("optimize_bound_args", {})
        opt.update({"iteration": iterations, "lr_alpha": lr})
        optimizable = {n.name for n in self.module.optimizable_activations}
        result: dict[str, tuple[Tensor, Tensor]] = {}
        for k, name in enumerate(names):
            # Nothing to optimise before this node (e.g. the first pre-activation node, which
            # CROWN bounds exactly over a box, or one after only leaky ReLUs): CROWN's bounds.
            if k == 0 or not optimizable & self._ancestors(name):
                result[name] = crown[name]
                continue
            fixed = {n: [result[n][0], result[n][1]] for n in names[:k]}
            bounds = self._bound_node(x, name, "CROWN-Optimized", **{_FIXED_BOUNDS_KW: fixed})
            result[name] = _intersect(bounds, crown[name])
        return result

    def output_bounds(self, center: Tensor, perturbation: Any, C: Tensor | None = None,
                      method: str = "crown", alpha_iterations: int = 20,
                      alpha_lr: float = 0.1) -> tuple[Tensor, Tensor]:
        """auto_LiRPA's own bounds of ``C @ f(x)`` over the region (``[B, k]`` each).

        This is the plain LiRPA route (no Jacobian): e.g. a margin lower bound >= 0 certifies
        robustness directly.  ``C``: ``[B, k, n_out]`` (None: the outputs themselves).
        """
        table = {"ibp": "IBP", "crown": "CROWN", "crown-ibp": "CROWN-IBP",
                 "alpha-crown": "CROWN-Optimized"}
        if method not in table:
            raise InputError(f"unknown bound method {method!r}; choose from "
                             f"{', '.join(table)}")
        x = self._bounded_input(center, perturbation)
        if C is not None:
            C = C.to(self.device, self.dtype)
        if method == "alpha-crown":
            opt = self.module.bound_opts.setdefault("optimize_bound_args", {})
            opt.update({"iteration": alpha_iterations, "lr_alpha": alpha_lr})
            if not getattr(self.module, "optimizable_activations", None):
                method = "crown"
        if method == "alpha-crown":
            with lirpa_errors(table[method]):
                lb, ub = self.module.compute_bounds(x=(x,), C=C, method=table[method])
        else:
            with torch.no_grad(), lirpa_errors(table[method]):
                lb, ub = self.module.compute_bounds(x=(x,), C=C, method=table[method])
        return lb.detach(), ub.detach()
