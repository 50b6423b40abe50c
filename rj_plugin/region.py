"""Input regions: an l_p ball around a center, a box, or the whole space (global bounds)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rj_plugin.errors import InputError
from rj_plugin.lipschitz import dual_norm, parse_norm


@dataclass(frozen=True)
class Region:
    """The set of inputs a bound holds for.

    Attributes:
        center: ``[B, *input_shape]``; for a box, its midpoint.
        norm: 1.0, 2.0 or inf; a box is an l_inf region (for Lipschitz constants).
        eps: the ball's radius (None for a box or the global region).
        lower, upper: ``[B, *input_shape]`` for a box, else None.
        unbounded: True for the whole input space (global bounds).
    """

    center: Tensor
    norm: float
    eps: float | None = None
    lower: Tensor | None = None
    upper: Tensor | None = None
    unbounded: bool = False

    @property
    def is_box(self) -> bool:
        return self.lower is not None

    @property
    def batch(self) -> int:
        return self.center.shape[0]

    def select(self, index: slice) -> Region:
        """The sub-batch ``index`` of this region."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Region(self.center[index], self.norm, self.eps, pick(self.lower), pick(self.upper),
                      self.unbounded)

    def support(self, coef: Tensor) -> Tensor:
        """max over the region of coef . x, per input of the batch: ``coef [B, ..., n]`` (x
        flattened to n) -> ``[B, ...]``.  A box: coef . mid + |coef| . half; an l_p ball:
        coef . x0 + eps ||coef||_q (q the dual norm)."""
        if self.unbounded:
            raise ValueError("the whole input space has no finite support function")
        shape = (coef.shape[0],) + (1,) * (coef.dim() - 2) + (-1,)
        if self.is_box:
            lo, hi = self.lower.flatten(1), self.upper.flatten(1)
            return ((coef * ((lo + hi) / 2).reshape(shape)).sum(-1)
                    + (coef.abs() * ((hi - lo) / 2).reshape(shape)).sum(-1))
        return (coef * self.center.flatten(1).reshape(shape)).sum(-1) + self.eps * \
            torch.linalg.vector_norm(coef, ord=dual_norm(self.norm), dim=-1)

    def magnitude(self) -> Tensor:
        """A bound on |x| over the region, entrywise: ``[B, n]`` (x flattened)."""
        if self.is_box:
            return torch.maximum(self.lower.flatten(1).abs(), self.upper.flatten(1).abs())
        return self.center.flatten(1).abs() + self.eps

    def describe(self) -> dict:
        """A JSON-friendly description (for result files)."""
        if self.unbounded:
            return {"kind": "global"}
        if self.is_box:
            return {"kind": "box", "norm": "inf", "lower": self.lower.tolist(),
                    "upper": self.upper.tolist()}
        return {"kind": "ball", "norm": _norm_name(self.norm), "eps": self.eps,
                "center": self.center.tolist()}


def _norm_name(p: float) -> str:
    return "inf" if math.isinf(p) else str(int(p))


def _as_batch(x: Tensor, input_shape: tuple[int, ...] | None, what: str) -> Tensor:
    if input_shape is not None:
        if tuple(x.shape) == tuple(input_shape):
            return x.unsqueeze(0)
        if tuple(x.shape[1:]) != tuple(input_shape):
            dims = ", ".join(map(str, input_shape))
            raise InputError(f"{what} has shape {tuple(x.shape)}; the model takes "
                             f"{tuple(input_shape)} (or a batch [B, {dims}])")
    elif x.dim() < 2:
        x = x.unsqueeze(0)
    return x


def _check_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise InputError(f"{what} contains NaN or inf (first at index {bad})")


def make_region(x0=None, eps=None, norm="inf", lower=None, upper=None, *,
                unbounded: bool = False, input_shape: tuple[int, ...] | None = None,
                dtype: torch.dtype = torch.float64, device="cpu") -> Region:
    """Validate the user's region arguments and build a :class:`Region`.

    Either ``x0`` and ``eps`` (an l_p ball; ``eps = 0`` is the single point x0), or ``lower``
    and ``upper`` (a box), or ``unbounded=True`` with ``x0`` giving the shape.
    """
    p = parse_norm(norm)
    as_tensor = lambda v: torch.as_tensor(v, dtype=dtype, device=device)  # noqa: E731
    if lower is not None or upper is not None:
        if lower is None or upper is None:
            raise InputError("a box needs both lower and upper")
        if x0 is not None or eps is not None:
            raise InputError("give either a box (lower, upper) or a ball (x0, eps), not both")
        lo = _as_batch(as_tensor(lower), input_shape, "lower")
        hi = _as_batch(as_tensor(upper), input_shape, "upper")
        if lo.shape != hi.shape:
            raise InputError(f"box lower {tuple(lo.shape)} and upper {tuple(hi.shape)} differ")
        _check_finite(lo, "lower")
        _check_finite(hi, "upper")
        if (lo > hi).any():
            bad = torch.nonzero(lo > hi)[0].tolist()
            raise InputError(f"box lower > upper at index {bad}")
        return Region((lo + hi) / 2, math.inf, None, lo, hi)
    if x0 is None:
        raise InputError("no region: give x0 and eps, or lower and upper")
    center = _as_batch(as_tensor(x0), input_shape, "x0")
    _check_finite(center, "x0")
    if unbounded:
        return Region(center, p, math.inf, unbounded=True)
    if eps is None:
        raise InputError("eps is missing (use eps=0 for the Jacobian at x0 itself)")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"eps must be a number, got {eps!r}") from None
    if math.isnan(eps) or eps < 0 or math.isinf(eps):
        raise InputError(f"eps must be finite and >= 0, got {eps}")
    return Region(center, p, eps)
