"""Compatibility patches that make auto-LiRPA 0.3 run on torch 2.x and numpy 2.

auto-LiRPA 0.3 (2022) was written against torch 1.11/1.12 and numpy 1.x.  On the versions pinned
by this project (torch 2.14, numpy 2) it cannot even be imported, and once it imports, several
code paths break -- one of them silently (alpha-CROWN degenerating to plain CROWN, see
:func:`_patch_alpha_clamp_gradient`).  Every patch lives here, so the rest of the plugin can use
auto_LiRPA as if nothing were wrong.

Each patch is a small function that

* checks whether its problem actually exists (by looking for the missing attribute, probing the
  behaviour, or checking that the code to be replaced is 0.3's -- never by comparing version
  strings), and returns ``False`` without touching anything when it does not: where a later
  auto_LiRPA release (0.4-0.7) changed the code a patch targets, that patch does nothing (only
  0.3 is installed and tested here);
* otherwise installs the smallest fix it can and returns ``True``.

0.3 bugs that can be avoided by options are not patched: see :func:`default_bound_opts`.

Usage::

    from rj_plugin import compat
    auto_LiRPA = compat.import_auto_lirpa()          # or: compat.apply(); import auto_LiRPA
    model = auto_LiRPA.BoundedModule(net, x, bound_opts=compat.default_bound_opts())
"""

from __future__ import annotations

import collections
import importlib
import inspect
import logging
import math
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["applied", "apply", "default_bound_opts", "import_auto_lirpa"]

# Names of the patches applied in this process, in the order they were applied.
_APPLIED: list[str] = []
# Private switch for the test-suite: when False, the alpha clamp-gradient patch is not installed
# (and, if already installed, its straight-through gradient is bypassed at run time).  It exists
# only so that a test can check that alpha-CROWN really depends on this patch.
_ALPHA_STE_ENABLED = True
# Marker attribute set on every function/class we replace, so re-applying is a no-op.
_MARK = "_rj_compat_patch"


def _mark(fn: Any, name: str) -> Any:
    setattr(fn, _MARK, name)
    return fn


def _is_marked(obj: Any) -> bool:
    return getattr(obj, _MARK, None) is not None


def _marks(fn: Any) -> list[str]:
    """Names of the patches in a chain of wrappers (each one's ``__wrapped__``), outermost first."""
    names = []
    while fn is not None:
        if _is_marked(fn):
            names.append(getattr(fn, _MARK))
        fn = getattr(fn, "__wrapped__", None)
    return names


def _record(name: str) -> None:
    if name not in _APPLIED:
        _APPLIED.append(name)


# -------------------------------------------------------------------------------------------------
# Pre-import patches (must be in place before ``import auto_LiRPA``).
# -------------------------------------------------------------------------------------------------


def _patch_numpy_arraysetops() -> bool:
    """Re-create ``numpy.lib.arraysetops`` (numpy 2 removed it).

    What broke: auto_LiRPA 0.3 ``operators/base.py`` does ``from numpy.lib.arraysetops import
    isin``.  numpy 2.0 made that module private (``numpy.lib._arraysetops_impl``), so
    ``import auto_LiRPA`` raises ``ModuleNotFoundError`` on numpy >= 2.
    Why it is correct: the set routines are the same functions, still public as ``numpy.isin``
    etc.; we register a module object under the old name that exposes them.
    Guard: only when ``import numpy.lib.arraysetops`` fails.
    """
    try:
        importlib.import_module("numpy.lib.arraysetops")
        return False
    except ImportError:
        pass
    import numpy as np

    mod = types.ModuleType("numpy.lib.arraysetops")
    mod.__doc__ = "rj_plugin.compat alias of the numpy 1.x set routines (removed in numpy 2)."
    for name in ("ediff1d", "intersect1d", "isin", "setdiff1d", "setxor1d", "union1d", "unique"):
        if hasattr(np, name):
            setattr(mod, name, getattr(np, name))
    setattr(mod, _MARK, "numpy_arraysetops")
    sys.modules["numpy.lib.arraysetops"] = mod
    np.lib.arraysetops = mod  # type: ignore[attr-defined]
    return True


def _patch_onnx_set_opset_version() -> bool:
    """Restore ``torch.onnx.symbolic_helper._set_opset_version``.

    What broke: auto_LiRPA 0.3 ``parse_graph.py`` does ``from torch.onnx.symbolic_helper import
    _set_opset_version`` and calls ``_set_opset_version(12)`` before ``_optimize_graph``.  The
    TorchScript ONNX exporter moved to ``torch.onnx._internal.torchscript_exporter``;
    ``torch.onnx.symbolic_helper`` is now only a star re-export of
    ``torch.onnx._internal.torchscript_exporter.symbolic_helper`` (private names are not
    re-exported), and ``_set_opset_version`` itself no longer exists anywhere in torch 2.14, so
    ``import auto_LiRPA`` raises ``ImportError``.
    Why it is correct: in the torch releases that had it (1.13-2.x) its body was
    ``GLOBALS.export_onnx_opset_version = opset_version``; ``GLOBALS`` now lives in
    ``torch.onnx._internal.torchscript_exporter._globals`` (formerly ``torch.onnx._globals``) and
    is what ``_optimize_graph`` reads the opset version from.  We re-add that function (or alias
    the real one if some torch version still has it in the new location).
    Guard: only when ``torch.onnx.symbolic_helper`` lacks the attribute.
    """
    helper = importlib.import_module("torch.onnx.symbolic_helper")
    if hasattr(helper, "_set_opset_version"):
        return False
    moved = _first_attr(
        "_set_opset_version", ("torch.onnx._internal.torchscript_exporter.symbolic_helper",)
    )
    if moved is None:
        onnx_globals = _first_attr(
            "GLOBALS",
            ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"),
        )
        if onnx_globals is None:
            raise ImportError("rj_plugin.compat: cannot find torch's ONNX exporter GLOBALS")

        def _set_opset_version(opset_version: int) -> None:
            """Set the opset version used by the TorchScript ONNX passes (torch 1.x API)."""
            onnx_globals.export_onnx_opset_version = opset_version

        moved = _mark(_set_opset_version, "onnx_set_opset_version")
    helper._set_opset_version = moved
    return True


def _first_attr(name: str, modules: tuple[str, ...]) -> Any:
    """``getattr(module, name)`` for the first importable module that has it, else ``None``."""
    for mod_name in modules:
        try:
            value = getattr(importlib.import_module(mod_name), name, None)
        except ImportError:
            continue
        if value is not None:
            return value
    return None


def _patch_onnx_optimize_graph() -> bool:
    """Restore ``torch.onnx.utils._optimize_graph`` if it is no longer re-exported.

    What broke / may break: auto_LiRPA 0.3 ``parse_graph.py`` does ``from torch.onnx.utils import
    _optimize_graph``.  The function moved to ``torch.onnx._internal.torchscript_exporter.utils``
    ``torch.onnx.utils`` is now a star re-export of that module.  torch 2.14 still
    lists ``_optimize_graph`` in the new module's ``__all__``, so on the pinned torch this patch
    is a no-op; it keeps the import working if the name is dropped from the re-export.
    Why it is correct: it is the very same function object, same signature.
    Guard: only when ``torch.onnx.utils`` lacks the attribute.
    """
    utils = importlib.import_module("torch.onnx.utils")
    if hasattr(utils, "_optimize_graph"):
        return False
    moved = _first_attr("_optimize_graph", ("torch.onnx._internal.torchscript_exporter.utils",))
    if moved is None:
        raise ImportError("rj_plugin.compat: cannot find torch's ONNX _optimize_graph")
    utils._optimize_graph = moved
    return True


def _node_getitem(node: torch._C.Node, name: str) -> Any:
    """``node[name]``: the value of attribute ``name`` of a TorchScript node (torch 1.x API)."""
    kind = node.kindOf(name)  # "f", "fs", "i", "is", "s", "ss", "t", "ts", "g", "gs", "ty", ...
    getter = getattr(node, kind, None)
    if getter is None:
        raise KeyError(f"rj_plugin.compat: unsupported attribute kind {kind!r} for {name!r}")
    return getter(name)


def _patch_node_getitem() -> bool:
    """Re-add ``torch._C.Node.__getitem__`` (attribute access by name).

    What broke: auto_LiRPA 0.3 ``parse_graph.parse_graph`` reads node attributes with
    ``{k: n[k] for k in n.attributeNames()}``.  The pybind ``Node.__getitem__`` of the torch 1.x
    releases 0.3 was written for does not exist in torch 2.14, so parsing any model with an
    attributed ONNX node (Gemm's alpha/beta, Flatten's axis, LeakyRelu's alpha, ...) raises
    ``TypeError: 'torch._C.Node' object is not subscriptable``.
    Why it is correct: the old ``__getitem__`` dispatched on ``kindOf(name)`` to the typed getter;
    torch still exposes ``kindOf`` and getters named exactly like the kinds (``f``, ``i``, ``s``,
    ``t``, ``fs``, ``is``, ``ss``, ``ts``, ``g``, ``gs``, ``ty``, ``tys``, ``ival``, ``c``, ...).
    Note the list-of-ints getter is ``is`` (``is_`` is its *setter*), hence ``getattr``.
    Guard: only when ``torch._C.Node`` has no ``__getitem__``.
    """
    if hasattr(torch._C.Node, "__getitem__"):
        return False
    torch._C.Node.__getitem__ = _mark(_node_getitem, "node_getitem")  # type: ignore[method-assign]
    return True


# -------------------------------------------------------------------------------------------------
# Post-import patches (patch auto_LiRPA classes; applied right after importing it).
# -------------------------------------------------------------------------------------------------


def _patch_named_members(al: types.ModuleType) -> bool:
    """Let ``BoundedModule._named_members`` accept torch 2's ``remove_duplicate`` keyword.

    What broke: auto_LiRPA 0.3 overrides ``nn.Module._named_members(get_members_fn, prefix='',
    recurse=True)`` on ``BoundedModule`` (to translate node names back to the original parameter
    names) and ``BoundDataParallel`` (to forward to the wrapped module).  torch 2.x's
    ``nn.Module.parameters()`` / ``named_parameters()`` / ``buffers()`` call it with
    ``remove_duplicate=...``, so ``list(bounded_module.parameters())`` raises ``TypeError``.
    0.3 itself calls ``list(self.parameters())`` in ``backward_bound.get_sparse_C`` (dtype of the
    identity C for intermediate nodes that are not Linear/MatMul, e.g. an ``Add``/``Sub`` feeding a
    ReLU in ``conv_mode='matrix'``), so this also breaks ``compute_bounds`` on such models.
    Why it is correct: the replacement delegates to torch's own ``nn.Module._named_members`` (same
    duplicate handling as torch, including ``remove_duplicate=False``) and then applies exactly
    0.3's renaming (``name -> self.node_name_map[name]`` when present).
    Guard: only for classes that define their own ``_named_members`` without ``remove_duplicate``,
    and only when torch's ``nn.Module._named_members`` takes ``remove_duplicate``.
    """
    if "remove_duplicate" not in inspect.signature(torch.nn.Module._named_members).parameters:
        return False
    patched = False
    bounded_module = getattr(al, "BoundedModule", None)
    if bounded_module is not None and _needs_named_members_fix(bounded_module):

        def _named_members(
            self: Any,
            get_members_fn: Callable[[torch.nn.Module], Any],
            prefix: str = "",
            recurse: bool = True,
            remove_duplicate: bool = True,
        ) -> Iterator[tuple[str, Any]]:
            name_map = getattr(self, "node_name_map", {})
            for name, value in torch.nn.Module._named_members(
                self,
                get_members_fn,
                prefix=prefix,
                recurse=recurse,
                remove_duplicate=remove_duplicate,
            ):
                yield name_map.get(name, name), value

        bounded_module._named_members = _mark(_named_members, "named_members")
        patched = True
    data_parallel = getattr(al, "BoundDataParallel", None)
    if data_parallel is not None and _needs_named_members_fix(data_parallel):

        def _dp_named_members(
            self: Any,
            get_members_fn: Callable[[torch.nn.Module], Any],
            prefix: str = "",
            recurse: bool = True,
            remove_duplicate: bool = True,
        ) -> Iterator[tuple[str, Any]]:
            return self.module._named_members(
                get_members_fn, prefix, recurse, remove_duplicate=remove_duplicate
            )

        data_parallel._named_members = _mark(_dp_named_members, "named_members")
        patched = True
    return patched


def _needs_named_members_fix(cls: type) -> bool:
    """True when ``cls`` overrides ``_named_members`` with the torch 1.x signature."""
    own = cls.__dict__.get("_named_members")
    if own is None or _is_marked(own):
        return False
    params = inspect.signature(own).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return "remove_duplicate" not in params and not has_var_kw


def _clamp_grad_vanishes_at_bounds() -> bool:
    """Autograd probe: does ``torch.clamp(x, 0, 1)`` have zero gradient at ``x = 0`` and ``x = 1``?

    torch 1.x and torch <= 2.13 pass the gradient through at the bounds (mask ``lo <= x <= hi``);
    torch 2.14 gives 0 exactly at the bounds (only strictly inside the interval does it pass).
    """
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.clamp(x, min=0.0, max=1.0).sum(), x)
    return bool((grad == 0).any())


def _clamp_pass_through(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``torch.clamp(x, lo, hi)`` with the torch <= 2.13 gradient: 1 on ``[lo, hi]``, 0 outside.

    The value is bit-for-bit ``torch.clamp(x, lo, hi)`` (inside the interval it *is* ``x``).  Only
    the gradient at the two end points differs from torch 2.14's clamp: it passes through, as the
    (sub)gradient of a projected parameter should, instead of being cut to 0.
    """
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x, torch.clamp(x, min=lo, max=hi).detach())


def _relu_mask_alpha_pass_through(
    lower: torch.Tensor,
    upper: torch.Tensor,
    lb_lower_d: torch.Tensor | None,
    ub_lower_d: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """auto_LiRPA 0.3's ``BoundRelu._relu_mask_alpha`` with a gradient-passing alpha clamp."""
    clamp = (
        _clamp_pass_through
        if _ALPHA_STE_ENABLED
        else (lambda t, lo, hi: torch.clamp(t, min=lo, max=hi))
    )
    lower_mask = (lower >= 0).requires_grad_(False).to(lower.dtype)
    upper_mask = (upper <= 0).requires_grad_(False)
    zero_coeffs = upper_mask.all()
    no_mask = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
    if lb_lower_d is not None:
        lb_lower_d = clamp(lb_lower_d, 0.0, 1.0) * no_mask + lower_mask
    if ub_lower_d is not None:
        ub_lower_d = clamp(ub_lower_d, 0.0, 1.0) * no_mask + lower_mask
    return lb_lower_d, ub_lower_d, zero_coeffs


def _matches_03_relu_mask_alpha(fn: Callable[..., Any]) -> bool:
    """Behavioural check that ``fn`` is 0.3's ``_relu_mask_alpha`` and that it blocks gradients.

    The replacement must compute exactly what the original computes; we compare values on a
    probe that covers every case (stable-active, stable-inactive, unstable; alpha below, at and
    above [0, 1]) and check that the original indeed returns a zero gradient for an alpha at 0/1.
    """
    lower = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    upper = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, -0.5], dtype=torch.float64)
    alpha = torch.tensor([0.0, 1.0, 0.3, -0.2, 1.4, 0.0, 1.0], dtype=torch.float64)
    a_orig = alpha.clone().requires_grad_(True)
    try:
        lb, ub, zero = fn(lower, upper, a_orig, a_orig * 1.0)
    except Exception:  # noqa: BLE001 - different signature/semantics: not the 0.3 function
        return False
    lb_ref, ub_ref, zero_ref = _relu_mask_alpha_pass_through(lower, upper, alpha, alpha)
    if lb is None or ub is None or not torch.equal(lb.detach(), lb_ref):
        return False
    if not torch.equal(ub.detach(), ub_ref) or bool(zero) != bool(zero_ref):
        return False
    (grad,) = torch.autograd.grad(lb[:2].sum(), a_orig)
    return bool((grad[:2] == 0).all())


def _patch_alpha_clamp_gradient(al: types.ModuleType) -> bool:
    """Make alpha-CROWN's ReLU slopes trainable again on torch 2.14.

    What broke: alpha-CROWN ('CROWN-Optimized') initialises every unstable ReLU's lower slope alpha
    to exactly 0 or 1 (CROWN's adaptive choice) and, in ``BoundRelu._relu_mask_alpha``, reads it
    through ``torch.clamp(alpha, min=0., max=1.)``.  Up to torch 2.13 clamp's gradient is 1 on the
    closed interval, so Adam moves the alphas (and ``clip_alpha_`` projects them back into
    [0, 1] after each step, on ``.data``, outside autograd).  On torch 2.14 clamp's gradient is 0
    *at* the bounds, so every alpha gets a zero gradient forever: alpha-CROWN silently returns
    exactly the CROWN bound.  (Found by comparing 'CROWN' and 'CROWN-Optimized' bounds.)
    Why it is correct: the replacement computes the identical value (bit-for-bit, checked by a
    probe at install time) and only restores the closed-interval gradient of the clamp, i.e. the
    projected-gradient behaviour alpha-CROWN was designed and tested with.  Soundness does not
    depend on gradients at all: any alpha in [0, 1] gives a valid bound.
    Narrowness: only ``BoundRelu._relu_mask_alpha`` (the one place where 0.3 reads ReLU alphas
    through a clamp inside autograd) is replaced; ``torch.clamp`` is untouched for everyone else.
    Guard: only when the autograd probe shows clamp's gradient vanishing at the bounds, and the
    existing ``_relu_mask_alpha`` behaves exactly like 0.3's and blocks the gradient.
    """
    if not _ALPHA_STE_ENABLED or not _clamp_grad_vanishes_at_bounds():
        return False
    relu = getattr(getattr(al, "operators", None), "BoundRelu", None)
    if relu is None:
        return False
    current = relu.__dict__.get("_relu_mask_alpha")
    if current is None or _is_marked(
        current.__func__ if isinstance(current, staticmethod) else current
    ):
        return False
    fn = current.__func__ if isinstance(current, staticmethod) else current
    if not _matches_03_relu_mask_alpha(fn):
        return False
    relu._relu_mask_alpha = staticmethod(_mark(_relu_mask_alpha_pass_through, "alpha_clamp_grad"))
    return True


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _patch_alpha_dtype(al: types.ModuleType) -> bool:
    """Create alpha-CROWN's optimisable slopes in the model's dtype (float64 models).

    What broke: auto_LiRPA 0.3 creates the alphas with a hard-coded float32 dtype
    (``BoundRelu.init_opt_parameters``: ``dtype=torch.float``; ``BoundTanh`` -- hence
    ``BoundSigmoid`` / ``BoundAtan`` -- : ``torch.empty(...)`` with the default dtype).  For a
    float64 model, 'CROWN-Optimized' then returns float32 bounds for ReLU nets (the alphas pull
    the whole bound computation down to float32 -- rounding that a certified bound must not
    have), and fails for Tanh/Sigmoid/atan nets with ``RuntimeError: Index put requires the
    source and destination dtypes match``.  This is independent of the torch version.
    Why it is correct: right after the original ``init_opt_parameters`` we replace every alpha
    whose floating dtype differs from the layer input's bounds by the same values converted to
    that dtype (a fresh leaf with ``requires_grad``, exactly how 0.3 creates them; the optimizer
    is built afterwards from ``node.alpha``).  A float32 model is untouched.
    Guard: only for classes whose ``init_opt_parameters`` source never mentions the input's
    ``.dtype``; at run time, only alphas whose dtype actually differs are converted.
    """
    ops = getattr(al, "operators", None)
    patched = False
    for cls_name in ("BoundRelu", "BoundTanh"):
        cls = getattr(ops, cls_name, None)
        original = None if cls is None else cls.__dict__.get("init_opt_parameters")
        if original is None or _is_marked(original) or ".dtype" in _source(original):
            continue
        cls.init_opt_parameters = _mark(_alpha_dtype_wrapper(original), "alpha_dtype")
        patched = True
    return patched


def _alpha_dtype_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def init_opt_parameters(self: Any, start_nodes: Any) -> Any:
        result = original(self, start_nodes)
        ref = getattr(self.inputs[0], "lower", None)
        alphas = getattr(self, "alpha", None)
        if isinstance(ref, torch.Tensor) and isinstance(alphas, dict):
            for key, value in list(alphas.items()):
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and value.dtype != ref.dtype
                ):
                    alphas[key] = value.detach().to(ref.dtype).requires_grad_(True)
        return result

    init_opt_parameters.__doc__ = original.__doc__
    init_opt_parameters.__wrapped__ = original  # type: ignore[attr-defined]
    return init_opt_parameters


_SSHAPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, Any, Any, Any]] = {}


def _patch_sshape_table_cache(al: types.ModuleType) -> bool:
    """Share the Tanh / Sigmoid / atan tangent-point tables between nodes.

    What it fixes: 0.3's ``precompute_relaxation`` rebuilds, for *every* S-shaped node it creates,
    the same lookup tables (50,000 points, 100 bisection steps each): about 0.3 s per node on an
    idle 2-core machine and several seconds under load, which dominated building and bounding
    small tanh networks.  Not a correctness bug; independent of the torch version.
    Why it is correct: the tables depend only on the activation (the node's class), ``x_limit``,
    the default dtype and the device; they are computed by auto_LiRPA's own function once per
    such key and shared (read-only: 0.3 only indexes them).
    Guard: only when ``BoundTanh`` has 0.3's ``precompute_relaxation(self, name, func, dfunc,
    x_limit)``.
    """
    cls = getattr(getattr(al, "operators", None), "BoundTanh", None)
    original = None if cls is None else cls.__dict__.get("precompute_relaxation")
    if original is None or _is_marked(original):
        return False
    if list(inspect.signature(original).parameters)[:4] != ["self", "name", "func", "dfunc"]:
        return False

    def precompute_relaxation(self: Any, name: str, func: Callable[..., Any],
                              dfunc: Callable[..., Any], x_limit: float = 500) -> None:
        key = (type(self), float(x_limit), torch.get_default_dtype(), str(self.device))
        if key not in _SSHAPE_TABLES:
            original(self, name, func, dfunc, x_limit)
            _SSHAPE_TABLES[key] = (self.d_lower, self.d_upper, self.x_limit, self.step_pre,
                                   self.num_points_pre)
        (self.d_lower, self.d_upper, self.x_limit, self.step_pre,
         self.num_points_pre) = _SSHAPE_TABLES[key]

    precompute_relaxation.__doc__ = original.__doc__
    cls.precompute_relaxation = _mark(precompute_relaxation, "sshape_table_cache")
    return True


def _patch_sshape_table_dtype(al: types.ModuleType) -> bool:
    """Use tangent-point tables of the model's dtype for Tanh / Sigmoid / atan relaxations.

    What broke: ``BoundTanh.precompute_relaxation`` (shared by ``BoundSigmoid`` and
    ``BoundAtan``) builds its lookup tables ``d_lower`` / ``d_upper`` of pre-computed tangent
    points once, in the default dtype (float32), when the node is created.  For a float64 model,
    'CROWN', 'CROWN-IBP' and 'CROWN-Optimized' all fail in ``add_linear_relaxation`` with
    ``Index put requires the source and destination dtypes match`` (float32 intercepts written
    into float64 buffers).  Independent of the torch version.
    Why it is correct: merely casting the float32 tables would keep tangent points whose
    validity was only checked in float32 arithmetic; instead, the first time a relaxation is
    built for another dtype we re-run auto_LiRPA's own ``precompute_relaxation`` (same function,
    same ``func``/``dfunc``, same ``x_limit``) with that dtype as the default dtype, cache the
    tables per dtype, and use the ones matching the input bounds.  float32 models are untouched.
    Guard: only when ``BoundTanh`` has 0.3's ``precompute_relaxation(name, func, dfunc, x_limit)``
    and ``bound_relax_impl(x, func, dfunc)``; at run time only when the dtypes differ.
    """
    cls = getattr(getattr(al, "operators", None), "BoundTanh", None)
    if cls is None:
        return False
    precompute = cls.__dict__.get("precompute_relaxation")
    impl = cls.__dict__.get("bound_relax_impl")
    if precompute is None or impl is None or _is_marked(impl):
        return False
    if list(inspect.signature(precompute).parameters)[:4] != ["self", "name", "func", "dfunc"]:
        return False
    if list(inspect.signature(impl).parameters) != ["self", "x", "func", "dfunc"]:
        return False

    def bound_relax_impl(
        self: Any, x: Any, func: Callable[..., Any], dfunc: Callable[..., Any]
    ) -> Any:
        dtype = x.lower.dtype
        table = getattr(self, "d_lower", None)
        if isinstance(table, torch.Tensor) and table.dtype != dtype and dtype.is_floating_point:
            cache = self.__dict__.setdefault("_rj_compat_tables", {})
            cache.setdefault(table.dtype, (self.d_lower, self.d_upper))
            if dtype not in cache:
                previous = torch.get_default_dtype()
                torch.set_default_dtype(dtype)
                try:
                    # the class attribute: the shared-table version when that patch is applied
                    type(self).precompute_relaxation(self, "rj_compat", func, dfunc,
                                                     x_limit=self.x_limit)
                finally:
                    torch.set_default_dtype(previous)
                cache[dtype] = (self.d_lower.to(dtype), self.d_upper.to(dtype))
            self.d_lower, self.d_upper = cache[dtype]
        return impl(self, x, func, dfunc)

    bound_relax_impl.__doc__ = impl.__doc__
    cls.bound_relax_impl = _mark(bound_relax_impl, "sshape_table_dtype")
    return True


def _model_dtype(module: Any, x: Any) -> torch.dtype | None:
    """Floating dtype of the bounded input (or, failing that, of the module's parameters)."""
    candidates: list[Any] = []
    if isinstance(x, (tuple, list)):
        candidates.extend(x)
    elif x is not None:
        candidates.append(x)
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    for param in torch.nn.Module.parameters(module):
        if param.is_floating_point():
            return param.dtype
    return None


def _patch_optimize_in_model_dtype(al: types.ModuleType) -> bool:
    """Run alpha-CROWN's optimisation loop with the model's dtype as torch's default dtype.

    What broke: auto_LiRPA 0.3's ``get_optimized_bounds`` casts the best bounds to
    ``torch.get_default_dtype()`` in the last iteration (and tensors it creates follow the
    default dtype).  For a float64 model under the usual float32 default, the returned bounds are
    rounded to float32 to nearest (not outward: a certified bound may move past the true value),
    and once the alphas are float64 (``alpha_dtype`` patch) the loop fails with ``Index put
    requires the source and destination dtypes match``.  Independent of the torch version.
    Why it is correct: the optimisation is exactly the same; only the dtype that auto_LiRPA
    takes as "default" inside this call equals the dtype of the bounded input, so no cast
    happens.  The previous default dtype is restored on exit (also on errors).
    Guard: only when ``get_optimized_bounds`` casts to ``torch.get_default_dtype()``; at run time
    only when the input dtype differs from the default dtype.
    """
    cls = getattr(al, "BoundedModule", None)
    original = None if cls is None else getattr(cls, "get_optimized_bounds", None)
    if original is None or _is_marked(original):
        return False
    if "get_default_dtype()" not in _source(original):
        return False

    cls.get_optimized_bounds = _mark(_in_model_dtype(original), "optimize_in_model_dtype")
    return True


def _in_model_dtype(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``BoundedModule`` method ``(self, x, ...)`` to run with the bounded input's dtype
    as torch's default dtype (restored afterwards, also on errors); a no-op when they agree."""

    def wrapper(self: Any, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        dtype = _model_dtype(self, x)
        previous = torch.get_default_dtype()
        if dtype is None or dtype == previous or dtype not in (torch.float32, torch.float64):
            return method(self, x, *args, **kwargs)
        torch.set_default_dtype(dtype)
        try:
            return method(self, x, *args, **kwargs)
        finally:
            torch.set_default_dtype(previous)

    wrapper.__doc__ = method.__doc__
    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _patch_default_spec_dtype(al: types.ModuleType) -> bool:
    """Build the default specification C in the model's dtype.

    What broke: without an explicit ``C``, 0.3's ``compute_bounds`` uses
    ``torch.eye(dim_output)`` in torch's default dtype (float32).  For a float64 model, operators
    that combine A with their bias by ``einsum`` (e.g. ``BoundAbs``) then fail with ``expected
    scalar type Float but found Double``; others silently compute in mixed precision.
    Independent of the torch version.
    Why it is correct: the call runs with the bounded input's dtype as default dtype, so the
    identity C is built in that dtype; nothing else changes.  The previous default is restored.
    Guard: only when ``compute_bounds`` builds C with ``torch.eye`` and no dtype; at run time only
    for a float64/float32 input whose dtype differs from the default.
    """
    cls = getattr(al, "BoundedModule", None)
    original = None if cls is None else getattr(cls, "compute_bounds", None)
    if original is None or _is_marked(original):
        return False
    if "torch.eye(dim_output, device=self.device)" not in _source(original):
        return False

    cls.compute_bounds = _mark(_in_model_dtype(original), "default_spec_dtype")
    return True


# -------------------------------------------------------------------------------------------------
# Soundness patches for l_p balls (p < inf)
# -------------------------------------------------------------------------------------------------

# Pure views of a tensor that keep C-order element positions: the center of a ball seen through
# them is the ball's center reshaped.
_VIEW_OPS = frozenset({"BoundReshape", "BoundFlatten", "BoundUnsqueeze", "BoundSqueeze"})
# Marker on an ``Interval`` that *is* an l_p ball (a point interval at the ball's center).
_BALL_MARK = "_rj_exact_ball"


def _is_finite_lp(ptb: Any, al: types.ModuleType) -> bool:
    norm = getattr(ptb, "norm", None)
    return (isinstance(ptb, al.perturbations.PerturbationLpNorm) and norm is not None
            and 0 < float(norm) < float("inf"))


def _ball_root(node: Any, al: types.ModuleType) -> Any:
    """The perturbed input node behind ``node`` if ``node`` is that input or a pure view of it
    (reshape/flatten/(un)squeeze) and its perturbation is a finite-p ball, else None."""
    while type(node).__name__ in _VIEW_OPS and getattr(node, "inputs", None):
        node = node.inputs[0]
    if type(node).__name__ != "BoundInput" or not _is_finite_lp(getattr(node, "perturbation",
                                                                        None), al):
        return None
    center = getattr(node, "center", None)
    return node if isinstance(center, torch.Tensor) else None


def _patch_lp_input_box(al: types.ModuleType) -> bool:
    """Give an l_p ball (1 <= p < inf) a sound interval: its enclosing box, not its center.

    What broke: 0.3's ``PerturbationLpNorm.init`` sets the input node's interval to
    ``[x0, x0]`` for p < inf and relies on the first Linear/Conv reading the perturbation's
    ``(norm, eps)`` off that interval (``mid = v[0][0]``).  Every other consumer of the input
    (``(x - m) / s``, ``2 * x``, ``tanh(x)``, the relaxation of an activation on the raw input,
    a residual ``x + g(x)``) sees a single point, so IBP, CROWN, CROWN-IBP and alpha-CROWN all
    return bounds of x0 alone (widths ~1e-15 whatever eps): unsound.  Unary monotone ops also
    forward the perturbation object on their output interval, so a Linear after ``tanh(x)``
    would apply the ball's radius around ``tanh(x0)``, which is only right for 1-Lipschitz ops.
    Why it is correct: the ball ``||x - x0||_p <= eps`` lies in the box ``x0 +- eps`` (rounded
    outwards), which becomes the input node's interval, so every op bounds a superset of the
    ball.  ``Interval.get_perturbation`` reports l_inf (a box) for finite-p intervals, except
    for a point interval that this patch itself marks as the ball's center; the Linear and Conv
    interval rules, when their input is the ball (the input node or a pure reshape of it),
    additionally run 0.3's dual-norm rule on that marked center and keep the intersection of
    both (each is sound, so the intersection is).  CROWN's concretisation at the input never
    read the interval (it uses the center and eps), so it is unchanged.
    Guard: only when 0.3's ``init`` gives a finite-p ball the point interval (``x_L = x_U = x``).
    """
    ptb_cls = al.perturbations.PerturbationLpNorm
    original_init = ptb_cls.init
    if _is_marked(original_init) or "x_L = x_U = x" not in _source(original_init):
        return False
    interval_cls = al.operators.base.Interval
    original_get = interval_cls.get_perturbation

    def init(self: Any, x: Any, aux: Any = None, forward: bool = False) -> Any:
        result = original_init(self, x, aux=aux, forward=forward)
        if forward or not _is_finite_lp(self, al):
            return result
        bound, center, extra = result
        eps = float(self.eps)
        lower = torch.nextafter(x - eps, torch.full_like(x, float("-inf")))
        upper = torch.nextafter(x + eps, torch.full_like(x, float("inf")))
        return al.linear_bound.LinearBound(None, None, None, None, lower, upper), center, extra

    def get_perturbation(interval: Any) -> Any:
        ptb = getattr(interval, "ptb", None)
        if _is_finite_lp(ptb, al) and not getattr(interval, _BALL_MARK, False):
            return float("inf"), float("nan")
        return original_get(interval)

    original_make = interval_cls.make_interval

    def make_interval(lb: Any, ub: Any, other: Any = None) -> Any:
        # 0.3's Linear re-wraps its input interval with make_interval: keep the marker.
        result = original_make(lb, ub, other)
        if getattr(other, _BALL_MARK, False) and lb is other[0] and ub is other[1]:
            setattr(result, _BALL_MARK, True)
        return result

    original_ptb_init = ptb_cls.__init__

    def ptb_init(self: Any, *args: Any, **kwargs: Any) -> None:
        with np.errstate(divide="ignore"):  # the dual of p = 1 is 1 / (1 - 1/1) = inf
            original_ptb_init(self, *args, **kwargs)

    ptb_cls.__init__ = _mark(ptb_init, "lp_input_box")
    ptb_cls.init = _mark(init, "lp_input_box")
    interval_cls.get_perturbation = staticmethod(_mark(get_perturbation, "lp_input_box"))
    interval_cls.make_interval = staticmethod(_mark(make_interval, "lp_input_box"))
    for cls in (al.operators.BoundLinear, al.operators.BoundConv,
                al.operators.BoundConvTranspose):
        cls.interval_propagate = _mark(_ball_aware_interval(cls.interval_propagate, al),
                                       "lp_input_box")
    return True


def _ball_aware_interval(original: Callable[..., Any], al: types.ModuleType
                         ) -> Callable[..., Any]:
    """Wrap a Linear/Conv ``interval_propagate``: the box rule always; when the input is an l_p
    ball, also 0.3's dual-norm rule on the ball's center, intersected with the box rule."""

    def interval_propagate(self: Any, *v: Any, **kwargs: Any) -> Any:
        box = original(self, *v, **kwargs)
        root = None if self is None or not v else _ball_root(self.inputs[0], al)
        if root is None:
            return box
        center = root.center.reshape(v[0][0].shape)
        ball = al.operators.base.Interval(center, center, ptb=root.perturbation)
        setattr(ball, _BALL_MARK, True)
        try:
            with np.errstate(divide="ignore"):  # 0.3 computes the l_1 ball's dual as 1 / 0
                lp = original(self, ball, *v[1:], **kwargs)
        except NotImplementedError:  # e.g. 0.3's ConvTranspose has no l_p rule
            return box
        return torch.maximum(box[0], lp[0]), torch.minimum(box[1], lp[1])

    interval_propagate.__doc__ = original.__doc__
    return interval_propagate


def _patch_leaky_relu_steep(al: types.ModuleType) -> bool:
    """Linear relaxation of a leaky ReLU whose negative slope exceeds 1.

    What broke: 0.3's ``BoundLeakyRelu.bound_backward`` assumes slope a <= 1, where the function
    is convex on an unstable interval: it takes the chord as the upper line and a line through
    the origin (slope 1 or a) as the lower one.  For a > 1 the function is concave, the chord is
    *below* it, and CROWN / CROWN-IBP / alpha-CROWN return pre-activation intervals with
    lower > upper that exclude the true values (J(x0) itself falls outside at eps = 0).
    Why it is correct: for a > 1, leaky(z) = min(z, a z) is concave, so on [l, u] (widened as 0.3
    does to l <= 0 <= u) the chord through (l, a l) and (u, u) is a lower bound and every line
    s z with 1 <= s <= a is an upper bound (z >= 0: s z >= z; z <= 0: s z >= a z).  We take
    s = 1 when the chord's slope is nearer 1 (the interval is mostly positive), else a; both
    are exact for stable neurons.  The rest mirrors 0.3's rule with the two roles swapped.
    Guard: only when 0.3's rule builds ``upper_d`` from the chord; at run time only for a > 1
    (slopes <= 1 go to the original rule).
    """
    cls = getattr(al.operators, "BoundLeakyRelu", None)
    original = None if cls is None else getattr(cls, "bound_backward", None)
    if original is None or _is_marked(original):
        return False
    if "upper_d = (ub_r - self.alpha * lb_r) / (ub_r - lb_r)" not in _source(original):
        return False

    def bound_backward(self: Any, last_lA: Any, last_uA: Any, x: Any = None, *args: Any,
                       **kwargs: Any) -> Any:
        slope = float(self.alpha)
        if slope <= 1.0:
            return original(self, last_lA, last_uA, x, *args, **kwargs)
        src = x if x is not None else self
        lb_r, ub_r = src.lower.clamp(max=0), src.upper.clamp(min=0)
        ub_r = torch.max(ub_r, lb_r + 1e-8)
        chord_d = (ub_r - slope * lb_r) / (ub_r - lb_r)
        chord_b = slope * lb_r - lb_r * chord_d
        tangent_d = torch.where(chord_d < (1.0 + slope) / 2, torch.ones_like(chord_d),
                                torch.full_like(chord_d, slope))
        chord_d, tangent_d = chord_d.unsqueeze(0), tangent_d.unsqueeze(0)
        lA = uA = None
        lbias = ubias = 0
        if last_uA is not None:
            pos, neg = last_uA.clamp(min=0), last_uA.clamp(max=0)
            uA = tangent_d * pos + chord_d * neg
            ubias = self.get_bias(neg, chord_b)
        if last_lA is not None:
            pos, neg = last_lA.clamp(min=0), last_lA.clamp(max=0)
            lA = chord_d * pos + tangent_d * neg
            lbias = self.get_bias(pos, chord_b)
        return [(lA, uA)], lbias, ubias

    cls.bound_backward = _mark(bound_backward, "leaky_relu_steep")
    return True


def _patch_avgpool_semantics(al: types.ModuleType) -> bool:
    """Average pooling with the options the model really uses, and an exact backward rule.

    What broke: 0.3's ``BoundAveragePool`` ignores the ONNX attributes ``ceil_mode`` and
    ``count_include_pad`` (it hard-codes False / True), so ``count_include_pad=False`` with
    padding computes different values than the model (and the IBP bounds of those values), and
    ``ceil_mode=True`` changes the output shape (a shape error further on).  Its ``bound_backward``
    (the matrix mode the plugin uses) transposes the pooling by nearest-neighbour upsampling,
    which is only the transpose when the stride equals the kernel and there is no padding;
    overlapping or padded pooling gets wrong CROWN coefficients.
    Why it is correct: the forward uses the node's own attributes (ONNX defaults: ceil_mode 0,
    count_include_pad 0), and the backward applies the exact transpose of that linear map,
    ``avg_pool2d_backward`` (the vector-Jacobian product of the same pooling, linear in the
    coefficients and differentiable, so alpha-CROWN's gradients flow through it).  IBP stays
    0.3's monotone rule on the (now correct) forward: pooling has non-negative weights.
    Guard: only when 0.3's ``__init__`` hard-codes ``self.count_include_pad = True``.
    """
    cls = getattr(al.operators, "BoundAveragePool", None)
    original_init = None if cls is None else cls.__init__
    if original_init is None or _is_marked(original_init):
        return False
    if "self.count_include_pad = True" not in _source(original_init):
        return False
    original_backward = cls.bound_backward

    def __init__(self: Any, attr: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        original_init(self, attr, *args, **kwargs)
        self.ceil_mode = bool(attr.get("ceil_mode", 0))
        self.count_include_pad = bool(attr.get("count_include_pad", 0))

    def bound_backward(self: Any, last_lA: Any, last_uA: Any, x: Any, *args: Any,
                       **kwargs: Any) -> Any:
        if not all(a is None or isinstance(a, torch.Tensor) for a in (last_lA, last_uA)):
            return original_backward(self, last_lA, last_uA, x, *args, **kwargs)
        shape = tuple(self.input_shape[1:])

        def transpose(last_A: Any) -> Any:
            if last_A is None:
                return None
            flat = last_A.reshape(-1, *last_A.shape[2:])
            reference = flat.new_empty(flat.shape[0], *shape)
            grad = torch.ops.aten.avg_pool2d_backward(
                flat, reference, list(self.kernel_size), list(self.stride), list(self.padding),
                self.ceil_mode, self.count_include_pad, None)
            return grad.reshape(*last_A.shape[:2], *shape)

        return [(transpose(last_lA), transpose(last_uA))], 0, 0

    cls.__init__ = _mark(__init__, "avgpool_semantics")
    cls.bound_backward = _mark(bound_backward, "avgpool_semantics")
    return True


def _patch_best_ret_any_rank(al: types.ModuleType) -> bool:
    """alpha-CROWN's best-result bookkeeping for bounds of any rank.

    What broke: 0.3's ``optimized_bounds._update_best_ret`` finds the improved batch entries with
    ``(new > best).any(dim=1).view(-1)``, which is one flag per batch entry only for 2-d bounds.
    The bounds of a convolutional node are ``[B, C, H, W]``: the mask gets B*H*W flags and
    indexing the batch with it raises ``IndexError`` (alpha-CROWN on any CNN with two conv
    layers, where a conv pre-activation node is optimised).
    Why it is correct: the same update -- per batch entry, keep the elementwise better of the new
    and the best bounds (and results) where any element improved -- with the mask reduced over
    all non-batch dimensions, which is what the 2-d case computes.
    Guard: only when 0.3's function reduces with ``.any(dim=1).view(-1)``.
    """
    module = getattr(al, "optimized_bounds", None)
    original = None if module is None else getattr(module, "_update_best_ret", None)
    if original is None or _is_marked(original):
        return False
    if ".any(dim=1).view(-1)" not in _source(original):
        return False

    def update_best_ret(full_ret_bound: torch.Tensor, best_ret_bound: torch.Tensor,
                        full_ret: Any, best_ret: Any, need_update: bool, idx: int) -> Any:
        if idx not in (0, 1):
            raise ValueError("idx is 0 (lower bound) or 1 (upper bound)")
        improved = full_ret_bound > best_ret_bound if idx == 0 else \
            full_ret_bound < best_ret_bound
        better = torch.maximum if idx == 0 else torch.minimum
        mask = improved.reshape(improved.shape[0], -1).any(dim=1)
        rows = None
        if mask.any():
            need_update = True
            rows = mask.nonzero(as_tuple=True)[0]
            best_ret_bound[rows] = better(full_ret_bound[rows], best_ret_bound[rows])
            if full_ret[idx] is not None:
                best_ret[idx][rows] = better(full_ret[idx][rows], best_ret[idx][rows])
        return best_ret_bound, best_ret, mask, rows, need_update

    module._update_best_ret = _mark(update_best_ret, "best_ret_any_rank")
    return True


def _patch_softplus_relaxation(al: types.ModuleType) -> bool:
    """A linear relaxation for softplus, so CROWN and alpha-CROWN bound it.

    What broke: 0.3's ``BoundSoftplus`` has no ``bound_relax``; CROWN on a net with softplus
    raises ``NotImplementedError`` (only IBP works).
    Why it is correct: softplus(z) = log(1 + e^z) is convex, so on [l, u] its chord lies above it
    and its tangent at any point (here the midpoint m, slope sigmoid(m)) lies below it (moved down
    by log(1 + e^-20) where u > 20: torch's softplus is the identity above 20).  For
    l = u the chord is replaced by the tangent at l (exact there).  Both lines are moved outwards
    by a few ulps of the magnitudes involved, so rounding in the evaluated values (and the
    cancellation in the chord's slope when u - l is tiny, whose effect on [l, u] is at most a few
    ulps of softplus) cannot cross the function.
    Guard: only when ``BoundSoftplus`` does not define its own ``bound_relax``.
    """
    cls = getattr(al.operators, "BoundSoftplus", None)
    if cls is None or "bound_relax" in cls.__dict__:
        return False

    def bound_relax(self: Any, x: Any) -> None:
        lower, upper = x.lower, x.upper
        sp = torch.nn.functional.softplus
        ulp = torch.finfo(lower.dtype).eps * 16
        mid = (lower + upper) / 2
        k_low = torch.sigmoid(mid)
        b_low = sp(mid) - k_low * mid
        f_l, f_u = sp(lower), sp(upper)
        width = upper - lower
        chord = (f_u - f_l) / torch.where(width > 0, width, torch.ones_like(width))
        k_up = torch.where(width > 0, chord, torch.sigmoid(lower))
        b_up = f_l - k_up * lower
        slack = ulp * (f_l.abs() + f_u.abs() + k_up.abs() * (lower.abs() + upper.abs()) + 1e-300)
        # torch's softplus (what the model computes) is z itself above 20, below log(1 + e^z)
        # by at most log(1 + e^-20): the lower line moves down by that much where it matters.
        gap = torch.where(upper > 20.0, torch.full_like(upper, math.log1p(math.exp(-20.0))), 0.0)
        self.lw, self.lb = k_low, b_low - ulp * (b_low.abs() + (k_low * mid).abs()) - gap
        self.uw, self.ub = k_up, b_up + slack

    cls.bound_relax = _mark(bound_relax, "softplus_relaxation")
    return True


def _patch_ibp_spec_any_rank(al: types.ModuleType) -> bool:
    """IBP of a specification C applied to a node of any rank (a conv node's [B, C, H, W]).

    What broke: 0.3's ``IBP_general(node, C)`` ends with the static call
    ``BoundLinear.interval_propagate(None, node.interval, C=C)``, whose matrix products assume a
    flat node ``[B, n]``.  For a convolutional node and a batch of more than one input, CROWN-IBP
    (which runs this IBP step with the node's identity specification) fails with a shape error.
    Why it is correct: it is the same interval product, C mid +- |C| rad with mid and rad the
    center and radius of the node's interval, computed on the flattened node (C is flattened
    in the same C order as the node).
    Guard: only when 0.3's ``BoundLinear.interval_propagate`` takes C itself as the weight for a
    static call; at run time only for static calls on nodes of rank > 2.
    """
    cls = al.operators.BoundLinear
    original = cls.interval_propagate
    if getattr(original, _MARK, None) == "ibp_spec_any_rank":
        return False
    if "w, lb, ub = C, torch.tensor(0., device=C.device)" not in _source(cls):
        return False

    def interval_propagate(self: Any, *v: Any, C: Any = None, w: Any = None) -> Any:
        if self is None and C is not None and w is None and v and v[0][0].dim() > 2:
            lower, upper = v[0][0].flatten(1), v[0][1].flatten(1)
            spec = C.reshape(*C.shape[:2], -1)
            mid, rad = ((upper + lower) / 2).unsqueeze(-1), ((upper - lower) / 2).unsqueeze(-1)
            center, deviation = (spec @ mid).squeeze(-1), (spec.abs() @ rad).squeeze(-1)
            return center - deviation, center + deviation
        return original(self, *v, C=C, w=w)

    cls.interval_propagate = _mark(interval_propagate, "ibp_spec_any_rank")
    return True


# -------------------------------------------------------------------------------------------------
# MatMul of a constant by a perturbed operand (issue #7, item 8: ``C @ JacobianOf(net)(x)``).
# -------------------------------------------------------------------------------------------------


def _dense_coefficients(last_A: Any, dtype: torch.dtype, utils: Any) -> torch.Tensor | None:
    """A backward coefficient ``last_A`` as a dense tensor ``[spec, B, *out]``, or None when it is
    of a kind this helper does not know (Patches, a tuple index, ...).

    0.3 passes a tensor, an identity ``eyeC(shape=[spec, B, *out])`` or a one-hot
    ``OneHotC(shape=[spec, B, *out], index, coeffs)`` whose ``index`` holds, per spec row
    (``[spec]``, shared by the batch) or per spec row and batch entry (``[spec, B]``), the flat
    position of the single non-zero entry of that row (value ``coeffs``, or 1 when ``coeffs`` is
    None).
    """
    if isinstance(last_A, torch.Tensor):
        return last_A.to(dtype)
    if isinstance(last_A, utils.eyeC):
        spec = last_A.shape[0]
        eye = torch.eye(spec, dtype=dtype, device=last_A.device)
        return eye.view(spec, 1, *last_A.shape[2:]).expand(*last_A.shape)
    if isinstance(last_A, utils.OneHotC) and isinstance(last_A.index, torch.Tensor) \
            and last_A.index.dim() in (1, 2):
        spec, batch = last_A.shape[0], last_A.shape[1]
        index = last_A.index.to(torch.long)
        if index.dim() == 1:
            index = index[:, None].expand(spec, batch)
        values = torch.ones(spec, batch, dtype=dtype, device=index.device)
        if last_A.coeffs is not None:
            coeffs = last_A.coeffs.to(dtype)
            values = values * (coeffs[:, None] if coeffs.dim() == 1 else coeffs)
        dense = torch.zeros(*last_A.shape, dtype=dtype, device=index.device)
        rows = torch.arange(spec, device=index.device)[:, None].expand(spec, batch)
        cols = torch.arange(batch, device=index.device)[None, :].expand(spec, batch)
        dense.view(spec, batch, -1)[rows, cols, index] = values
        return dense
    return None


def _sum_to_shape(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum ``t`` over the dimensions that broadcasting expanded from size 1 in ``shape``."""
    dims = tuple(i for i, (have, want) in enumerate(zip(t.shape, shape, strict=True))
                 if want == 1 and have != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _matmul_constant_left_backward(original: Callable[..., Any], utils: Any
                                   ) -> Callable[..., Any]:
    """``BoundMatMul.bound_backward`` that handles ``X @ Y`` with only ``Y`` perturbed itself
    (see :func:`_patch_matmul_constant_left`) and leaves every other case to ``original``."""

    def bound_backward(self: Any, last_lA: Any, last_uA: Any, *x: Any) -> Any:
        if len(x) != 2 or self.is_input_perturbed(0) or not self.is_input_perturbed(1):
            return original(self, last_lA, last_uA, *x)
        X, X_upper = x[0].lower, x[0].upper
        y_shape, out_shape = tuple(x[1].output_shape), tuple(self.output_shape)
        if not isinstance(X, torch.Tensor) or not isinstance(X_upper, torch.Tensor) \
                or X.dim() < 2 or len(y_shape) < 3 or X.dim() > len(y_shape) \
                or len(out_shape) != len(y_shape) or not torch.equal(X, X_upper):
            return original(self, last_lA, last_uA, *x)
        ref = next((a for a in (last_lA, last_uA) if isinstance(a, torch.Tensor)), None)
        dtype = ref.dtype if ref is not None else X.dtype
        dense = [None if a is None else _dense_coefficients(a, dtype, utils)
                 for a in (last_lA, last_uA)]
        if any(d is None and a is not None for d, a in zip(dense, (last_lA, last_uA),
                                                            strict=True)):
            return original(self, last_lA, last_uA, *x)
        X_t = X.to(dtype).transpose(-1, -2)

        def through(A: torch.Tensor | None) -> torch.Tensor | None:
            # A . (X @ Y) = (X^T @ A) . Y: the coefficient of Y is X^T A, summed over the
            # dimensions along which Y was broadcast; [spec, B, *out] -> [spec, B, *Y[1:]].
            # (A spec C given to compute_bounds arrives flat: [spec, B, prod(out)].)
            if A is None:
                return None
            A = A.reshape(A.shape[0], A.shape[1], *out_shape[1:])
            return _sum_to_shape(X_t.matmul(A), (A.shape[0], A.shape[1], *y_shape[1:]))

        return [(None, None), (through(dense[0]), through(dense[1]))], 0.0, 0.0

    bound_backward.__doc__ = original.__doc__
    bound_backward._rj_original = original  # type: ignore[attr-defined]
    return bound_backward


def _patch_matmul_constant_left(al: types.ModuleType) -> bool:
    """Bound ``X @ Y`` backwards (CROWN) when the left operand X is a constant.

    What broke: ``BoundMatMul.bound_backward`` is ``BoundLinear.bound_backward`` with the second
    operand as the "weight".  When that weight is perturbed (as ``J`` in ``C @ J`` with
    ``J = JacobianOf(net)(x)``, ``[B, n_out, d]``, and a constant ``C``, ``[k, n_out]``), 0.3 takes
    its weight-perturbation branch, which relaxes the product as a bilinear term (``BoundMul``)
    and assumes that the left operand carries the batch dimension: it raises ``ValueError:
    Unsupported shapes: x_shape [k, n_out], y_shape [B, n_out, d]`` (``BoundLinear._reshape``),
    and for a per-sample ``C`` ``[B, k, n_out]`` fails with a size mismatch.  CROWN could not
    bound anything computed from the product (the README advertises ``C @ J``); IBP works.
    Why it is correct: with X constant the product is linear in Y, so for any coefficients
    ``A`` ``[spec, B, *out]`` on the output, ``A . (X @ Y) = (X^T @ A) . Y`` exactly (matmul's
    batch broadcasting handled by summing ``X^T @ A`` over the dimensions along which Y was
    broadcast).  The lower and the upper bound both pass ``X^T @ A`` on to Y, with zero bias and
    no relaxation; an identity (``eyeC``) or one-hot (``OneHotC``) A is made dense first.
    Guard: only when ``BoundMatMul.bound_backward`` is 0.3's (delegates to
    ``BoundLinear.bound_backward``, whose ``_reshape`` raises 'Unsupported shapes'); at run time
    only when the left input is not perturbed (its interval is one value) and the right one is,
    X has rank >= 2, Y rank >= 3 (batch and matrix dims) and X no more dims than Y, and A is a
    tensor, eyeC or OneHotC.  Every other case runs 0.3's code unchanged.
    """
    ops = getattr(al, "operators", None)
    utils = getattr(al, "utils", None)
    cls = getattr(ops, "BoundMatMul", None)
    linear = getattr(ops, "BoundLinear", None)
    if cls is None or linear is None or not hasattr(utils, "eyeC") \
            or not hasattr(utils, "OneHotC"):
        return False
    original = cls.__dict__.get("bound_backward")
    if original is None or _is_marked(original):
        return False
    if "super().bound_backward(last_lA, last_uA, *x)" not in _source(original):
        return False
    if "Unsupported shapes" not in _source(getattr(linear, "_reshape", None)):
        return False
    cls.bound_backward = _mark(_matmul_constant_left_backward(original, utils),
                               "matmul_constant_left")
    return True


def _patch_conv_transpose_dilation(al: types.ModuleType) -> bool:
    """The transpose of a convolution whose dilation differs between height and width.

    What broke: 0.3's ``BoundConv.bound_backward`` (matrix mode) computes the ``output_padding``
    of the width from ``self.dilation[0]`` (the height's), so a convolution with dilation
    ``(d_h, d_w)``, d_h != d_w, gets a transposed convolution of the wrong size under CROWN,
    CROWN-IBP and alpha-CROWN ("output padding must be smaller than either stride or dilation",
    or a shape error later).
    Why it is correct: for such layers the coefficients are pushed back with
    ``torch.nn.grad.conv2d_input``, the exact vector-Jacobian product of the same convolution
    (linear in the coefficients and differentiable for alpha-CROWN); the bias term is the same
    sum as 0.3's.  Other layers (and patches mode) take 0.3's rule unchanged.
    Guard: only when 0.3's rule has the ``self.dilation[0]`` typo in the width's padding; at run
    time only for dilations that differ between the two axes.
    """
    cls = getattr(al.operators, "BoundConv", None)
    original = None if cls is None else cls.bound_backward
    if original is None or _is_marked(original):
        return False
    if "(int(weight.size()[3] - 1) * self.dilation[0])" not in _source(original):
        return False

    def bound_backward(self: Any, last_lA: Any, last_uA: Any, *x: Any, **kwargs: Any) -> Any:
        dilation = tuple(self.dilation)
        dense = all(a is None or isinstance(a, torch.Tensor) for a in (last_lA, last_uA))
        if len(dilation) != 2 or dilation[0] == dilation[1] or not dense or \
                self.is_input_perturbed(1):
            return original(self, last_lA, last_uA, *x, **kwargs)
        weight = x[1].lower

        def one_side(last_A: Any) -> tuple[Any, Any]:
            if last_A is None:
                return None, 0
            flat = last_A.reshape(-1, *last_A.shape[2:])
            size = (flat.shape[0], *self.input_shape[1:])
            next_A = torch.nn.grad.conv2d_input(size, weight, flat, self.stride, self.padding,
                                                dilation, self.groups)
            bias = torch.einsum("sbchw,c->sb", last_A, x[2].lower) if self.has_bias else 0
            return next_A.reshape(*last_A.shape[:2], *next_A.shape[1:]), bias

        lA, lbias = one_side(last_lA)
        uA, ubias = one_side(last_uA)
        return [(lA, uA), (None, None), (None, None)], lbias, ubias

    cls.bound_backward = _mark(bound_backward, "conv_transpose_dilation")
    return True


def _patch_matmul_ibp_spec(al: types.ModuleType) -> bool:
    """IBP of a specification C merged into a MatMul node.

    What broke: 0.3's ``IBP_general(node, C)`` merges C into the last layer when that node is a
    ``BoundLinear``, calling ``node.interval_propagate(*inputs, C=C)``; ``BoundMatMul`` subclasses
    ``BoundLinear`` but its ``interval_propagate(*v)`` takes no ``C``, so CROWN-IBP on a node that
    is ``x @ W`` raises ``TypeError``.
    Why it is correct: the MatMul's own interval, then C applied to it by 0.3's static interval
    product (``BoundLinear.interval_propagate(None, interval, C=C)``): a sound, if not merged,
    bound of C times the node.
    Guard: only when ``BoundMatMul.interval_propagate`` takes no keyword ``C``.
    """
    cls = getattr(al.operators, "BoundMatMul", None)
    original = None if cls is None else cls.__dict__.get("interval_propagate")
    if original is None or _is_marked(original):
        return False
    if "C" in inspect.signature(original).parameters:
        return False

    def interval_propagate(self: Any, *v: Any, C: Any = None) -> Any:
        interval = original(self, *v)
        if C is None:
            return interval
        return al.operators.BoundLinear.interval_propagate(None, interval, C=C)

    cls.interval_propagate = _mark(interval_propagate, "matmul_ibp_spec")
    return True


def _patch_unreached_start_nodes(al: types.ModuleType) -> bool:
    """alpha-CROWN: no alphas for backward passes that never reach an activation.

    What broke: 0.3's ``init_slope`` asks every optimisable activation for alphas for each node
    in ``backward_from[node]``, i.e. every later node the activation is an ancestor of in the
    graph, and initialises them from what the init CROWN pass recorded when it relaxed the
    activation: ``BoundTanh`` (hence ``BoundSigmoid`` / ``BoundAtan``) from
    ``tp_both_lower_init[start]``, ``BoundRelu`` from ``lower_d``.  A node whose backward bound
    passes no coefficients to an input cuts those paths: ``rj_plugin::Jacobian`` for its second
    input (its bounds are RecurJac's, not a function of the network's output, whose activations
    auto_LiRPA then never relaxes).  alpha-CROWN on e.g. ``relu(JacobianOf(net)(x))`` failed
    with ``KeyError`` (tanh nets) or ``AttributeError: ... no attribute 'lower_d'`` (ReLU nets).
    Why it is correct: an alpha for a start node whose backward pass never reaches the activation
    is never read (no relaxation of the activation is ever asked for it); the alphas of every
    reached start node are created exactly as 0.3 does.  Were such a pass to reach the node later,
    0.3 would fail loudly on the missing alpha, never bound with a wrong one.
    Guard: ``BoundTanh`` only when its ``init_opt_parameters`` reads ``tp_both_lower_init[ns]``,
    ``BoundRelu`` only when it reads ``self.lower_d``; at run time a ReLU keeps 0.3's code
    whenever some pass relaxed it (``lower_d`` set).
    """
    ops = al.operators
    patched = False
    for cls_name, needle in (("BoundTanh", "tp_both_lower_init[ns]"),
                             ("BoundRelu", "self.lower_d")):
        cls = getattr(ops, cls_name, None)
        original = None if cls is None else cls.__dict__.get("init_opt_parameters")
        if original is None or "unreached_start_nodes" in _marks(original):
            continue
        if needle not in _source(inspect.unwrap(original)):
            continue
        wrapper = _reached_only_tanh if cls_name == "BoundTanh" else _reached_only_relu
        cls.init_opt_parameters = _mark(wrapper(original), "unreached_start_nodes")
        patched = True
    return patched


def _reached_only_tanh(original: Callable[..., Any]) -> Callable[..., Any]:
    def init_opt_parameters(self: Any, start_nodes: Any) -> Any:
        reached = getattr(self, "tp_both_lower_init", None)
        if isinstance(reached, dict):
            start_nodes = [start for start in start_nodes if start[0] in reached]
        return original(self, start_nodes)

    init_opt_parameters.__doc__ = original.__doc__
    init_opt_parameters.__wrapped__ = original  # type: ignore[attr-defined]
    return init_opt_parameters


def _reached_only_relu(original: Callable[..., Any]) -> Callable[..., Any]:
    def init_opt_parameters(self: Any, start_nodes: Any) -> Any:
        if getattr(self, "lower_d", None) is None:  # never relaxed: no pass reaches it
            self.alpha = collections.OrderedDict()
            self.alpha_lookup_idx = collections.OrderedDict()
            self.alpha_indices = None
            return None
        return original(self, start_nodes)

    init_opt_parameters.__doc__ = original.__doc__
    init_opt_parameters.__wrapped__ = original  # type: ignore[attr-defined]
    return init_opt_parameters


def _unpatched(al: types.ModuleType, cls_name: str, attr: str, needle: str
               ) -> tuple[type, Callable[..., Any]] | None:
    """``(class, method)`` of ``al.operators.<cls_name>.<attr>`` when it is defined on that class,
    not patched yet, and its source contains ``needle`` (0.3's code); otherwise None."""
    cls = getattr(al.operators, cls_name, None)
    original = None if cls is None else cls.__dict__.get(attr)
    if original is None or _is_marked(original) or needle not in _source(original):
        return None
    return cls, original


def _patch_params_keep_requires_grad(al: types.ModuleType) -> bool:
    """A bounded module's forward leaves the caller's parameters' ``requires_grad`` alone.

    What broke: 0.3's ``BoundParams.forward`` returns ``self.param.requires_grad_(self.training)``.
    The parameter is the caller's own tensor (``BoundedModule`` shares it), so evaluating a
    module in eval mode -- which the plugin does for every model it bounds, and auto_LiRPA's
    users do for verification -- silently froze the caller's network: after bounding
    ``JacobianOf(net)``, ``net``'s weights had ``requires_grad=False`` and a training loop that
    regularises with the bounds stopped training it (in train mode, the reverse: a frozen
    parameter was unfrozen).
    Why it is correct: the same values are returned; in eval mode a ``Parameter`` view of the
    same storage without gradient (none flows to the caller's parameter, as 0.3 intends), in
    train mode the parameter itself (gradients flow when the caller's parameter requires them,
    torch's usual rule).  Only the flag on the caller's tensor is no longer written.
    Guard: only when ``BoundParams.forward`` calls ``requires_grad_(self.training)``.
    """
    target = _unpatched(al, "BoundParams", "forward", "requires_grad_(self.training)")
    if target is None:
        return False
    cls, original = target

    def forward(self: Any) -> Any:
        param = self.param_init if self.initializing else self.param
        if self.training or not isinstance(param, torch.nn.Parameter):
            return param
        # A Parameter (0.3's MatMul stores its operands as module attributes, where a plain
        # tensor may not replace a Parameter) sharing the storage, without gradient.
        return torch.nn.Parameter(param.detach(), requires_grad=False)

    forward.__doc__ = original.__doc__
    cls.forward = _mark(forward, "params_keep_requires_grad")
    return True


def _patch_nothing_to_optimise(al: types.ModuleType) -> bool:
    """alpha-CROWN whose bound depends on no alpha: one pass (= CROWN) instead of a crash.

    What broke: 0.3's ``get_optimized_bounds`` calls ``loss.backward()`` after every iteration
    but the last.  When the final bound depends on no alpha and not on the input tensor --
    nothing but linear ops after a ``rj_plugin::Jacobian`` node (``C @ J``, ``(J * v).sum``,
    ``|J|`` sums), whose bounds are constants to auto_LiRPA, while the network's activations
    before it get alphas only for bounds that never reach the final one -- the loss has no
    ``grad_fn`` and 0.3 fails with ``RuntimeError: element 0 of tensors does not require grad``.
    Why it is correct: a loss without ``grad_fn`` (with gradients enabled) depends on no
    optimised parameter, so every iteration would return the same bound; the same function is
    called again with one iteration, which computes it and skips ``backward``.
    Guard: only when ``get_optimized_bounds`` calls ``loss.backward()`` and skips it in its last
    iteration (``if i != iteration - 1``); at run time only for an error raised by that very
    ``loss.backward()`` line of this call (found in the traceback) while gradients are enabled.
    Anything else -- e.g. a failure inside a nested bound computation -- is raised unchanged.
    """
    cls = getattr(al, "BoundedModule", None)
    original = None if cls is None else getattr(cls, "get_optimized_bounds", None)
    if original is None or "nothing_to_optimise" in _marks(original):
        return False
    inner = inspect.unwrap(original)
    try:
        lines, first = inspect.getsourcelines(inner)
    except (OSError, TypeError):
        return False
    backward_lines = {first + k for k, line in enumerate(lines) if "loss.backward()" in line}
    if not backward_lines or not any("if i != iteration - 1" in line for line in lines):
        return False

    def raised_by_the_backward(exc: BaseException) -> bool:
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is inner.__code__:  # the outermost call of 0.3's function
                return tb.tb_lineno in backward_lines
            tb = tb.tb_next
        return False

    def get_optimized_bounds(self: Any, *args: Any, **kwargs: Any) -> Any:
        grad_enabled = torch.is_grad_enabled()
        try:
            return original(self, *args, **kwargs)
        except RuntimeError as exc:
            if not (grad_enabled and raised_by_the_backward(exc)):
                raise
        opts = self.bound_opts["optimize_bound_args"]
        iterations = opts["iteration"]
        opts["iteration"] = 1
        try:
            with warnings.catch_warnings():  # one pass: the scheduler steps, the optimiser not
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                return original(self, *args, **kwargs)
        finally:
            opts["iteration"] = iterations

    get_optimized_bounds.__doc__ = original.__doc__
    get_optimized_bounds.__wrapped__ = original  # type: ignore[attr-defined]
    cls.get_optimized_bounds = _mark(get_optimized_bounds, "nothing_to_optimise")
    return True


def _patch_shared_buffers(al: types.ModuleType) -> bool:
    """A bounded module reads the model's buffers (BatchNorm statistics) live, like its weights.

    What broke: 0.3's ``BoundBuffers`` registers ``value.clone().detach()``, a copy taken when the
    ``BoundedModule`` is built, while ``BoundParams`` shares the model's parameters.  After the
    model's running statistics changed in place (a train-mode forward, ``load_state_dict``, an
    edit), the bounds mixed new weights with old statistics: bounds of a network that no longer
    exists, which excluded the model's true outputs (found by fuzzing ``JacobianOf(net)`` heads
    that also use ``net(x)``; a plain ``BoundedModule(net)`` does the same).
    Why it is correct: the buffer node returns the model's own tensor (``detach``: same storage,
    no autograd history), so the bounds are those of the model as it is when they are computed.
    Building the module still restores the statistics that tracing a train-mode model changed
    (0.3 reloads its saved state dict into the module, i.e. now into the shared tensors).
    Guard: only when ``BoundBuffers.__init__`` registers ``value.clone().detach()``.
    """
    target = _unpatched(al, "BoundBuffers", "__init__", "value.clone().detach()")
    if target is None:
        return False
    cls, original = target
    base = cls.__mro__[1]

    def __init__(self: Any, ori_name: Any, value: Any, perturbation: Any = None) -> None:
        base.__init__(self, ori_name, None, perturbation)
        self.register_buffer("buffer", value.detach())

    __init__.__doc__ = original.__doc__
    cls.__init__ = _mark(__init__, "shared_buffers")
    return True


# -------------------------------------------------------------------------------------------------
# Public API
# -------------------------------------------------------------------------------------------------

_PRE_IMPORT: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("numpy_arraysetops", _patch_numpy_arraysetops),
    ("onnx_set_opset_version", _patch_onnx_set_opset_version),
    ("onnx_optimize_graph", _patch_onnx_optimize_graph),
    ("node_getitem", _patch_node_getitem),
)
_POST_IMPORT: tuple[tuple[str, Callable[[types.ModuleType], bool]], ...] = (
    ("named_members", _patch_named_members),
    ("alpha_clamp_grad", _patch_alpha_clamp_gradient),
    ("alpha_dtype", _patch_alpha_dtype),
    ("sshape_table_cache", _patch_sshape_table_cache),
    ("sshape_table_dtype", _patch_sshape_table_dtype),
    ("optimize_in_model_dtype", _patch_optimize_in_model_dtype),
    ("default_spec_dtype", _patch_default_spec_dtype),
    ("lp_input_box", _patch_lp_input_box),
    ("leaky_relu_steep", _patch_leaky_relu_steep),
    ("avgpool_semantics", _patch_avgpool_semantics),
    ("best_ret_any_rank", _patch_best_ret_any_rank),
    ("softplus_relaxation", _patch_softplus_relaxation),
    ("ibp_spec_any_rank", _patch_ibp_spec_any_rank),
    ("matmul_constant_left", _patch_matmul_constant_left),
    ("conv_transpose_dilation", _patch_conv_transpose_dilation),
    ("matmul_ibp_spec", _patch_matmul_ibp_spec),
    ("unreached_start_nodes", _patch_unreached_start_nodes),
    ("params_keep_requires_grad", _patch_params_keep_requires_grad),
    ("nothing_to_optimise", _patch_nothing_to_optimise),
    ("shared_buffers", _patch_shared_buffers),
)


def default_bound_opts() -> dict[str, Any]:
    """The ``bound_opts`` the plugin passes to ``BoundedModule`` (a fresh dict on every call).

    * ``conv_mode='matrix'``: with 0.3's default ``'patches'``, CROWN / alpha-CROWN raise
      ``IndexError: tuple index out of range`` on dense nets as soon as an ``Add``/``Sub`` node
      needs intermediate bounds (e.g. ``relu(linear(x) + c)``, residual sums); 'matrix' is the
      right mode for dense nets anyway.
    * ``sparse_spec_alpha=False``: avoids 0.3's ``assert self.alpha_lookup_idx[...] is None`` in
      ``BoundRelu._backward_relaxation`` when IBP says a neuron of a layer is unstable while
      CROWN proved the whole layer stable (sparse alpha of size 0 is created, then indexed).
    * ``sparse_features_alpha=False``: avoids 0.3's full-alpha bug when more than
      ``minimum_sparsity`` (90 %) of a ReLU layer is unstable (``alpha_indices`` is only reset
      when ``verbosity > 0``, so a full alpha is later scattered as if sparse -> shape error).
    * ``sparse_intermediate_bounds=False``: compute CROWN bounds for *every* pre-activation
      neuron.  With 0.3's default (True) CROWN is run only for neurons that IBP finds unstable and
      the IBP interval is kept for the others, so ``node.lower``/``node.upper`` are a mix of IBP
      and CROWN values.

    All four keys exist (and are harmless) in auto_LiRPA 0.4-0.7 too; ``BoundedModule`` ignores
    unknown keys in every version, so the same dict is returned everywhere.
    """
    return {
        "conv_mode": "matrix",
        "sparse_spec_alpha": False,
        "sparse_features_alpha": False,
        "sparse_intermediate_bounds": False,
    }


def apply() -> tuple[str, ...]:
    """Apply every needed patch (idempotent; safe to call many times).

    Must be called BEFORE ``import auto_LiRPA`` (the import itself fails without the first
    patches).  After the pre-import patches, this function imports auto_LiRPA itself to patch its
    classes.  Returns the names of the patches that were actually applied in this process (by this
    call or an earlier one), in order.
    """
    for name, patch in _PRE_IMPORT:
        if name not in _APPLIED and patch():
            _record(name)
    al = _quiet_import("auto_LiRPA")
    for name, post_patch in _POST_IMPORT:
        if name not in _APPLIED and post_patch(al):
            _record(name)
    return applied()


def _quiet_import(name: str) -> types.ModuleType:
    """Import ``name`` without two harmless, noisy messages auto_LiRPA 0.3 triggers on torch 2.x.

    (``FutureWarning: torch.jit.script is deprecated`` from its ``@torch.jit.script`` helpers, and
    ``No CUDA runtime is found`` logged by ``torch.utils.cpp_extension`` on CPU-only machines.)
    """
    if name in sys.modules:
        return sys.modules[name]
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        # auto_LiRPA 0.3 calls ``warnings.simplefilter("once")`` while importing, which would
        # override an "ignore" filter, so record everything and re-emit all other warnings.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            module = importlib.import_module(name)
    finally:
        cpp_logger.setLevel(level)
    for w in caught:
        if not (issubclass(w.category, FutureWarning) and "torch.jit.script" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return module


def applied() -> tuple[str, ...]:
    """Names of the patches applied so far in this process."""
    return tuple(_APPLIED)


def import_auto_lirpa() -> types.ModuleType:
    """Apply the patches, then import and return the ``auto_LiRPA`` module."""
    apply()
    return importlib.import_module("auto_LiRPA")
