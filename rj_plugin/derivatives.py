"""Certified ranges of an activation's derivative over an interval (spec section 2).

For an elementwise activation sigma and a pre-activation interval z in [l, u], a rule returns
tensors ``(g_lo, g_hi)`` of the same shape as ``l`` with

    g_lo <= sigma'(z) <= g_hi    for every z in [l, u]

(for every element of the Clarke generalised derivative at kinks, so that any sub-gradient that
autograd picks at a tie is covered).  ``l = -inf`` / ``u = +inf`` are allowed and give the global
ranges used for global Lipschitz constants.

Rules by shape of sigma':

* piecewise constant (ReLU, leaky ReLU, hard-tanh): the values sigma' takes on the pieces that
  [l, u] meets, including the kink value sets;
* monotone sigma' (softplus: sigma' = logistic, increasing, and 1 above torch's threshold of 20
  where torch's softplus is the identity; ELU with alpha <= 1: non-decreasing):
  ``[sigma'(l), sigma'(u)]``;
* even, unimodal sigma' with its maximum at 0 (tanh, sigmoid, arctan): the minimum is at the
  endpoint farthest from 0, the maximum at 0 if the interval straddles it, else at the endpoint
  nearest to 0.

Smooth rules evaluate sigma' in floating point; the result is widened outwards by a few ulps,
relative to the value and to sup|sigma'| (``_ULP_WIDEN``), so that rounding can never make a bound
exclude the value autograd computes (autograd's tanh' = 1 - tanh^2 carries an absolute error of
about one ulp of 1, large relative to tiny derivatives far from 0).

To add an activation: write a function ``(l, u) -> (g_lo, g_hi)`` that is sound in the sense
above, and register it with :func:`register_activation` under a name; then teach
:mod:`rj_plugin.chain` which graph node maps to that name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rj_plugin.errors import UnsupportedLayerError

DerivativeRule = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# Outward widening of evaluated smooth derivatives, in ulps (float64: 2.2e-16, float32: 1.2e-7).
_ULP_WIDEN = 8.0


@dataclass(frozen=True)
class Activation:
    """An elementwise activation known to the plugin.

    Attributes:
        name: registry key, e.g. ``"relu"`` or ``"leaky_relu:0.01"`` (the slope is part of the
            name because it changes the rule).
        rule: ``(l, u) -> (g_lo, g_hi)``, see the module docstring.
        max_abs_derivative: sup |sigma'| over the real line (for operator-norm products).
        derivative: sigma' itself, for the smooth activations whose derivative is Lipschitz
            (None otherwise); with ``max_abs_second`` = sup |sigma''| and ``max_abs_third`` =
            sup |sigma'''| it gives the linear bounds of :meth:`linear_derivative_bounds`.
        function: sigma itself (None where the plugin has no lines of it); with ``kinks`` (the
            breakpoints of a piecewise linear sigma) or ``max_abs_second`` it gives the lines
            of :meth:`linear_relaxation`.
        kinks: the breakpoints of a piecewise linear sigma, else None.
    """

    name: str
    rule: DerivativeRule
    max_abs_derivative: float
    derivative: Callable[[Tensor], Tensor] | None = None
    max_abs_second: float | None = None
    max_abs_third: float | None = None
    function: Callable[[Tensor], Tensor] | None = None
    kinks: tuple[float, ...] | None = None

    @property
    def linear_derivative(self) -> bool:
        """Whether :meth:`linear_derivative_bounds` is available."""
        return (self.derivative is not None and self.max_abs_second is not None
                and self.max_abs_third is not None)

    def linear_derivative_bounds(self, lower: Tensor, upper: Tensor, samples: int = 33
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        r"""Lines below and above sigma' over [l, u]: ``(alpha_lo, beta_lo, alpha_hi, beta_hi,
        mid)``, each like ``lower`` (finite bounds only), with

            alpha_lo z + beta_lo <= sigma'(z) <= alpha_hi z + beta_hi     for every z in [l, u].

        For a slope alpha, the offsets are the min and max of h(z) = sigma'(z) - alpha z over
        [l, u], bounded from ``samples`` equally spaced values delta apart.  Between two samples
        h exceeds the larger of them (falls below the smaller) by at most the smaller of two
        margins: M3 delta^2 / 8 (h'' = sigma''' is bounded by M3 = sup|sigma'''|, and such an h
        exceeds its chord by at most that), and (M2 + |alpha|) delta / 2 (h is Lipschitz with
        M2 = sup|sigma''| plus |alpha|).  The first wins on narrow intervals (on the digits net
        at eps 0.05 it is 5-15 times smaller: 6 % off the Lipschitz bound), the second on very
        wide ones.  A few ulps of the magnitudes widen both for rounding.  Candidates: slope 0
        and the chords between every two of nine equally spaced knots (the ends, quarters and
        eighths of [l, u]: 36 slopes, approximating the tangents a curved sigma' needs), with
        these offsets, and the certified range ``[g_lo, g_hi]`` of :meth:`bounds` as flat lines
        (so the lines are never worse than the constants); the upper line is the one lowest at
        the midpoint (equivalently, of least mean over [l, u]), the lower line the one highest
        there.  ``mid`` is sigma' at the
        midpoint (a reference for choosing relaxations).  Against the five chords of the whole
        interval and its quarters (a subset), the 36 took 3 % off the digits tanh net's linear
        Lipschitz bound at eps 0.05 and added 0.2-0.5 % on random tanh / sigmoid nets at eps 0.3:
        the midpoint is a heuristic, not the final objective.
        """
        if not self.linear_derivative:
            raise ValueError(f"{self.name}: no linear derivative bounds")
        width = upper - lower
        safe = torch.where(width > 0, width, torch.ones_like(width))
        steps = torch.linspace(0, 1, samples, dtype=lower.dtype, device=lower.device)
        z = lower[..., None] + width[..., None] * steps  # [..., samples]
        values = self.derivative(z)
        step = max(1, (samples - 1) // 8)
        knots = [(i, j) for i in range(0, samples, step) for j in range(i + step, samples, step)]
        slopes = [torch.zeros_like(width)] + [
            (values[..., j] - values[..., i]) * ((samples - 1) / (j - i)) / safe for i, j in knots]
        alphas = torch.stack(slopes, -1)  # [..., S]
        alphas = torch.where((width > 0)[..., None], alphas, torch.zeros_like(alphas))
        h = values[..., None, :] - alphas[..., None] * z[..., None, :]  # [..., S, samples]
        delta = width[..., None] / (samples - 1)
        margin = torch.minimum(self.max_abs_third * delta * delta / 8,
                               (self.max_abs_second + alphas.abs()) * delta / 2)
        scale = 1.0 + alphas.abs() * torch.maximum(lower.abs(), upper.abs())[..., None]
        margin = margin + 16 * torch.finfo(lower.dtype).eps * scale
        g_lo, g_hi = self.bounds(lower, upper)
        zero = torch.zeros_like(width)[..., None]
        alphas = torch.cat([alphas, zero], -1)  # [..., S + 1]: the flat certified range last
        beta_lo = torch.cat([h.amin(-1) - margin, g_lo[..., None]], -1)
        beta_hi = torch.cat([h.amax(-1) + margin, g_hi[..., None]], -1)
        mid = self.derivative((lower + upper) / 2)
        return (*_midpoint_best(alphas, beta_lo, beta_hi, lower, upper), mid)

    @property
    def has_linear_relaxation(self) -> bool:
        """Whether :meth:`linear_relaxation` is available (sigma itself known, and either its
        kinks (piecewise linear) or its smoothness constants)."""
        return self.function is not None and (
            self.kinks is not None or self.max_abs_second is not None)

    def linear_relaxation(self, lower: Tensor, upper: Tensor, samples: int = 33
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""Lines below and above sigma itself over [l, u]: ``(a_lo, c_lo, a_hi, c_hi)``, each
        like ``lower`` (finite bounds only), with

            a_lo z + c_lo <= sigma(z) <= a_hi z + c_hi       for every z in [l, u].

        For a slope a the offsets are the min and max of h(z) = sigma(z) - a z over [l, u]:

        * piecewise linear sigma (``kinks`` given): h is piecewise linear, so its extremes are
          among its values at l, u and the kinks inside: exact;
        * smooth sigma: from ``samples`` equally spaced values delta apart, widened by the
          smaller of M2 delta^2 / 8 (M2 = sup|sigma''| bounds h'') and (M1 + |a|) delta / 2
          (M1 = sup|sigma'|), as in :meth:`linear_derivative_bounds`.

        A few ulps of the magnitudes widen both for rounding.  Slopes tried: the chord's,
        sigma' at l, u (or the derivative range's ends) and the midpoint, and for smooth sigma the
        four quarter chords; also the flat lines [sigma(l), sigma(u)] (every activation with
        lines is non-decreasing).  The upper line is the one lowest at the midpoint (least mean
        over [l, u]), the lower line the one highest there; where l = u both are exact.
        """
        if not self.has_linear_relaxation:
            raise ValueError(f"{self.name}: no linear relaxation")
        fn = self.function
        width = upper - lower
        safe = torch.where(width > 0, width, torch.ones_like(width))
        f_lo, f_hi = fn(lower), fn(upper)
        g_lo, g_hi = self.bounds(lower, upper)
        slopes = [(f_hi - f_lo) / safe, g_lo, g_hi]
        if self.kinks is not None:
            z = torch.stack([lower, upper] + [torch.minimum(torch.maximum(
                torch.full_like(lower, k), lower), upper) for k in self.kinks], -1)
            values = fn(z)
        else:
            steps = torch.linspace(0, 1, samples, dtype=lower.dtype, device=lower.device)
            z = lower[..., None] + width[..., None] * steps  # [..., samples]
            values = fn(z)
            quarter = (samples - 1) // 4
            knots = values[..., ::quarter]
            if self.derivative is not None:  # tangents at the ends and the midpoint
                slopes += [self.derivative(lower), self.derivative(upper),
                           self.derivative((lower + upper) / 2)]
            slopes += [(knots[..., i + 1] - knots[..., i]) * 4 / safe for i in range(4)]
        alphas = torch.stack(slopes, -1)  # [..., S]
        alphas = torch.where((width > 0)[..., None], alphas, torch.zeros_like(alphas))
        h = values[..., None, :] - alphas[..., None] * z[..., None, :]  # [..., S, points]
        scale = 1.0 + values.abs().amax(-1, keepdim=True) + alphas.abs() * torch.maximum(
            lower.abs(), upper.abs())[..., None]
        margin = 16 * torch.finfo(lower.dtype).eps * scale
        if self.kinks is None:
            delta = width[..., None] / (samples - 1)
            margin = margin + torch.minimum(self.max_abs_second * delta * delta / 8,
                                            (self.max_abs_derivative + alphas.abs()) * delta / 2)
        zero = torch.zeros_like(width)[..., None]
        tiny = 16 * torch.finfo(lower.dtype).eps * (1.0 + f_lo.abs() + f_hi.abs())
        alphas = torch.cat([alphas, zero], -1)
        c_lo = torch.cat([h.amin(-1) - margin, (f_lo - tiny)[..., None]], -1)
        c_hi = torch.cat([h.amax(-1) + margin, (f_hi + tiny)[..., None]], -1)
        return _midpoint_best(alphas, c_lo, c_hi, lower, upper)

    def bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Derivative bounds ``(g_lo, g_hi)`` over ``[lower, upper]``, elementwise, same shape."""
        if lower.shape != upper.shape:
            raise ValueError(f"{self.name}: lower {tuple(lower.shape)} and upper "
                             f"{tuple(upper.shape)} differ in shape")
        return self.rule(lower, upper)

    def global_bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Derivative bounds over the whole real line, shaped like ``like``."""
        inf = torch.full_like(like, float("inf"))
        return self.rule(-inf, inf)



def _midpoint_best(alphas: Tensor, c_lo: Tensor, c_hi: Tensor, lower: Tensor, upper: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of candidate lines ``alphas z + c`` (``[..., S]`` each, all valid on [l, u]), the lower
    line highest and the upper line lowest at the midpoint (of largest / least mean over
    [l, u]): ``(a_lo, c_lo, a_hi, c_hi)``, each like ``lower``."""
    center = ((lower + upper) / 2)[..., None]
    hi_pick = (alphas * center + c_hi).argmin(-1, keepdim=True)
    lo_pick = (alphas * center + c_lo).argmax(-1, keepdim=True)
    return (alphas.gather(-1, lo_pick)[..., 0], c_lo.gather(-1, lo_pick)[..., 0],
            alphas.gather(-1, hi_pick)[..., 0], c_hi.gather(-1, hi_pick)[..., 0])


def _widen(g_lo: Tensor, g_hi: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Push evaluated derivative values outwards by a few ulps (relative, and of ``scale``);
    the lower end stays >= 0 (every smooth rule here has sigma' >= 0)."""
    eps = torch.finfo(g_lo.dtype).eps * _ULP_WIDEN
    return ((g_lo - eps * (g_lo.abs() + scale)).clamp(min=0),
            g_hi + eps * (g_hi.abs() + scale))


def _piecewise_linear_rule(neg_slope: float, pos_slope: float) -> DerivativeRule:
    """sigma'(z) = neg_slope for z < 0, pos_slope for z > 0, anything between at z = 0."""
    lo_s, hi_s = min(neg_slope, pos_slope), max(neg_slope, pos_slope)

    def rule(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        pos = lower > 0  # the whole interval lies on the positive piece
        neg = upper < 0  # the whole interval lies on the negative piece
        g_lo = torch.full_like(lower, lo_s)
        g_hi = torch.full_like(lower, hi_s)
        g_lo = torch.where(pos, torch.full_like(lower, pos_slope), g_lo)
        g_hi = torch.where(pos, torch.full_like(lower, pos_slope), g_hi)
        g_lo = torch.where(neg, torch.full_like(lower, neg_slope), g_lo)
        g_hi = torch.where(neg, torch.full_like(lower, neg_slope), g_hi)
        return g_lo, g_hi

    return rule


def _even_unimodal_rule(derivative: Callable[[Tensor], Tensor], peak: float) -> DerivativeRule:
    """sigma' even and unimodal with its maximum at 0 (tanh, sigmoid, arctan)."""

    def rule(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        far = torch.maximum(lower.abs(), upper.abs())
        straddles = (lower <= 0) & (upper >= 0)
        near = torch.where(straddles, torch.zeros_like(lower),
                           torch.minimum(lower.abs(), upper.abs()))
        return _widen(derivative(far), derivative(near), peak)

    return rule


def _monotone_rule(derivative: Callable[[Tensor], Tensor], sup: float) -> DerivativeRule:
    """sigma' non-decreasing: the range over [l, u] is [sigma'(l), sigma'(u)]."""

    def rule(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return _widen(derivative(lower), derivative(upper), sup)

    return rule


def _tanh_prime(z: Tensor) -> Tensor:
    # 1 / cosh^2 is accurate for large |z| (1 - tanh^2 cancels); cosh overflows to inf -> 0.
    return 1.0 / torch.cosh(z).square()


def _sigmoid_prime(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * torch.sigmoid(-z)


def _arctan_prime(z: Tensor) -> Tensor:
    return 1.0 / (1.0 + z.square())


def _elu_prime(alpha: float) -> Callable[[Tensor], Tensor]:
    def d(z: Tensor) -> Tensor:
        # The value at z = 0 is taken from the left piece; both pieces meet there when alpha = 1
        # and the left value alpha * e^0 = alpha <= 1 otherwise, so [d(l), d(u)] still covers it.
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(torch.clamp(z, max=0.0)))

    return d


# torch's softplus is the identity above this input (``nn.Softplus(threshold=20)``, the default and
# the only threshold the plugin accepts: ONNX's Softplus, what tracing records, has none).
SOFTPLUS_THRESHOLD = 20.0


def _softplus_rule(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """softplus' = sigmoid, increasing, except that torch's softplus is the identity (derivative
    exactly 1) above ``SOFTPLUS_THRESHOLD``: [sigmoid(l), sigmoid(u)], with 1 as the upper end
    once u exceeds the threshold (sigmoid(20) = 1 - 2e-9 would exclude it)."""
    g_lo, g_hi = _widen(torch.sigmoid(lower), torch.sigmoid(upper), 1.0)
    return g_lo, torch.where(upper > SOFTPLUS_THRESHOLD, torch.clamp(g_hi, min=1.0), g_hi)


def _hardtanh_rule(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """hardtanh' = 1 on (-1, 1) and 0 outside [-1, 1]; at +-1 any value in [0, 1]."""
    inside = (lower > -1) & (upper < 1)
    meets = (upper >= -1) & (lower <= 1)
    one, zero = torch.ones_like(lower), torch.zeros_like(lower)
    return torch.where(inside, one, zero), torch.where(meets, one, zero)


_REGISTRY: dict[str, Activation] = {}


def register_activation(activation: Activation) -> None:
    """Add (or replace) an activation in the registry under ``activation.name``."""
    _REGISTRY[activation.name] = activation


def get_activation(name: str) -> Activation:
    """Look up an activation; ``leaky_relu:<slope>`` and ``elu:<alpha>`` are built on demand."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    kind, _, param = name.partition(":")
    if kind == "leaky_relu" and param:
        slope = float(param)
        if slope < 0:
            raise UnsupportedLayerError(f"leaky ReLU slope {slope} < 0 is not monotone")
        act = Activation(name, _piecewise_linear_rule(slope, 1.0), max(1.0, slope),
                         function=lambda z: torch.nn.functional.leaky_relu(z, slope),
                         kinks=(0.0,))
    elif kind == "elu" and param:
        alpha = float(param)
        if not 0 <= alpha <= 1:
            raise UnsupportedLayerError(f"ELU alpha {alpha} outside [0, 1]: its derivative "
                                        "is then not monotone; not supported")
        act = Activation(name, _monotone_rule(_elu_prime(alpha), 1.0), 1.0)
    else:
        known = ", ".join(sorted(_REGISTRY)) + ", leaky_relu:<slope>, elu:<alpha>"
        raise UnsupportedLayerError(f"unknown activation {name!r}; known: {known}")
    register_activation(act)
    return act


for _act in (
    Activation("relu", _piecewise_linear_rule(0.0, 1.0), 1.0, function=torch.relu, kinks=(0.0,)),
    # sup|sigma''| and sup|sigma'''| (see linear_derivative_bounds), rounded up.  tanh'' =
    # -2 tanh sech^2, max 4 / (3 sqrt 3) at tanh^2 = 1/3; sigmoid'' = s (1 - s)(1 - 2 s), max
    # 1 / (6 sqrt 3); arctan'' = -2 z / (1 + z^2)^2, max 3 sqrt 3 / 8 at z^2 = 1/3.  With
    # t = tanh z, tanh''' = (6 t^2 - 2)(1 - t^2), extremes -2 (t = 0) and 2/3 (t^2 = 2/3); with
    # p = s (1 - s), s''' = p (1 - 6 p), extremes -1/8 (p = 1/4) and 1/24; arctan''' =
    # (6 z^2 - 2) / (1 + z^2)^3, extremes -2 (z = 0) and 1/2 (z^2 = 1).  softplus has no lines:
    # torch's softplus' jumps from sigmoid(20) to 1 at its threshold, so no smoothness margin
    # holds across it.
    Activation("tanh", _even_unimodal_rule(_tanh_prime, 1.0), 1.0, _tanh_prime, 0.76980036,
               2.0, torch.tanh),
    Activation("sigmoid", _even_unimodal_rule(_sigmoid_prime, 0.25), 0.25, _sigmoid_prime,
               0.09622505, 0.125, torch.sigmoid),
    Activation("arctan", _even_unimodal_rule(_arctan_prime, 1.0), 1.0, _arctan_prime,
               0.64951906, 2.0, torch.atan),
    Activation("softplus", _softplus_rule, 1.0),
    Activation("hardtanh", _hardtanh_rule, 1.0, function=torch.nn.functional.hardtanh,
               kinks=(-1.0, 1.0)),
):
    register_activation(_act)
