"""What every task gets: the model and its :class:`JacobianBounder`, output specifications,
regions, and the two bound routes (Jacobian bounds; auto_LiRPA's own output bounds).

Output specification (rows bounded), for an input with label c and ``n_out`` outputs:

* ``all``: the outputs themselves (``C = I``, rows ``y0 .. y{n-1}``);
* ``margins``: ``f_c - f_j`` for every j != c (``[n-1, n_out]``), or for ``j = target`` only;
* ``matrix``: a fixed ``C [k, n_out]`` from an ``.npy`` file.

Normalisation ``(x - mean) / std`` is prepended to the network as a first layer, so every bound
and radius is in the un-normalised input space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rj_plugin.api import JacobianBounder, JacobianBounds
from rj_plugin.config import RunConfig, parse_device
from rj_plugin.errors import InputError
from rj_plugin.lipschitz import parse_norm
from rj_plugin.lirpa import make_perturbation
from rj_plugin.region import Region

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Normalize(nn.Module):
    """``x -> (x - mean) / std`` with constant buffers broadcast over ``[B, *input_shape]``."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, *input_shape] -> [B, *input_shape]``."""
        return (x - self.mean) / self.std


def _norm_tensor(cfg: RunConfig, key: str, value: Any, shape: tuple[int, ...],
                 fill: float) -> Tensor:
    """A mean/std value as a tensor that broadcasts against ``[B, *shape]``."""
    if value is None:
        value = fill
    if not isinstance(value, list):
        return torch.tensor(float(value), dtype=torch.float64)
    t = torch.tensor(value, dtype=torch.float64)
    if len(value) == math.prod(shape):
        return t.reshape(shape)
    if len(value) == shape[0]:
        return t.reshape(shape[0], *([1] * (len(shape) - 1)))
    raise cfg.error(key, f"{len(value)} values fit neither the channels ({shape[0]}) nor the "
                         f"elements ({math.prod(shape)}) of the input {shape}")


def build_model(cfg: RunConfig) -> tuple[nn.Module, tuple[int, ...], dict[str, Any]]:
    """The network of the ``model`` section: ``(module, input_shape, description)``."""
    from rj_plugin.models import load_model

    m = cfg["model"]
    source = m["name"] if m["name"] is not None else str(cfg.paths["model.path"])
    module = load_model(source, dtype=torch.float64)
    recorded = getattr(module, "rj_input_shape", None)
    shape = tuple(m["input_shape"]) if m["input_shape"] is not None else recorded
    if shape is None:
        raise cfg.error("model.input_shape", "the model does not record its input shape; "
                                             "give model.input_shape")
    if recorded is not None and tuple(recorded) != tuple(shape):
        raise cfg.error("model.input_shape", f"the model takes {list(recorded)}, not "
                                             f"{list(shape)}")
    info: dict[str, Any] = {"source": source, "input_shape": list(shape)}
    if m["mean"] is not None or m["std"] is not None:
        mean = _norm_tensor(cfg, "model.mean", m["mean"], shape, 0.0)
        std = _norm_tensor(cfg, "model.std", m["std"], shape, 1.0)
        module = nn.Sequential(Normalize(mean, std), module)
        info["normalisation"] = {"mean": m["mean"], "std": m["std"]}
    module.rj_input_shape = shape
    return module, shape, info


@dataclass
class Spec:
    """Rows of an output specification: ``C [k, n_out]`` and their names."""

    C: Tensor
    names: list[str]
    kind: str

    @property
    def rows(self) -> int:
        return self.C.shape[0]


class RunContext:
    """The prepared model and the helpers every task uses.

    Args:
        cfg: the validated configuration.
        results_dir: where the run writes its files.
    """

    def __init__(self, cfg: RunConfig, results_dir: Path) -> None:
        self.cfg = cfg
        self.results_dir = results_dir
        general = cfg["general"]
        self.dtype = DTYPES[general["dtype"]]
        try:
            self.device = parse_device(general["device"])
        except ValueError as exc:
            raise cfg.error("general.device", str(exc)) from None
        module, shape, self.model_info = build_model(cfg)
        self.bounder = JacobianBounder(module, input_shape=shape, dtype=self.dtype,
                                       device=self.device)
        self.model = self.bounder.model
        self.input_shape = tuple(self.bounder.input_shape)
        self.dim = math.prod(self.input_shape)
        with torch.no_grad():
            probe = torch.zeros(1, *self.input_shape, dtype=self.dtype, device=self.device)
            out = self.model(probe)
        if out.dim() != 2:
            raise InputError(f"the model's output has shape {tuple(out.shape)}; expected "
                             "[B, n_outputs]")
        self.n_out = out.shape[1]
        target = cfg["specification"]["target"]
        if target is not None and not 0 <= target < self.n_out:
            raise cfg.error("specification.target", f"{target} is not an output index: the "
                                                    f"model has {self.n_out} outputs "
                                                    f"(0..{self.n_out - 1})")
        self.batchable = self._accepts_batches(probe)
        self.model_info["n_outputs"] = self.n_out
        self.norm_name = cfg["specification"]["norm"]
        self.norm = parse_norm(self.norm_name)
        self.gen = torch.Generator().manual_seed(general["seed"])
        self._matrix = self._load_matrix()

    def _accepts_batches(self, probe: Tensor) -> bool:
        """Whether the model and its auto_LiRPA graph take a batch of 2 (graphs traced with a
        hard-coded batch size of 1, e.g. ACAS Xu's Reshape to [1, 5], do not)."""
        pair = torch.cat([probe, torch.ones_like(probe)])
        try:
            with torch.no_grad():
                both = self.model(pair)
                one = self.model(pair[1:])
            region = self.bounder.region(lower=pair - 0.5, upper=pair + 0.5)
            self.bounder.bound(region, preact="ibp", method="interval")
        except RuntimeError:
            return False
        return both.shape == (2, self.n_out) and bool(torch.allclose(both[1:], one))

    def forward(self, x: Tensor) -> Tensor:
        """``f(x)`` for ``x: [N, *input_shape]`` -> ``[N, n_out]`` (differentiable); one input
        at a time for models that take no batches."""
        if self.batchable or x.shape[0] == 1:
            return self.model(x)
        return torch.cat([self.model(x[i:i + 1]) for i in range(x.shape[0])])

    # -- outputs -----------------------------------------------------------------------------

    def _load_matrix(self) -> Tensor | None:
        if self.cfg["specification"]["output"] != "matrix":
            return None
        path = self.cfg.paths["specification.matrix"]
        try:
            C = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self.cfg.error("specification.matrix", f"cannot read {path}: {exc}") from None
        if C.ndim == 1:
            C = C[None]
        if C.ndim != 2 or C.shape[1] != self.n_out:
            raise self.cfg.error("specification.matrix", f"C has shape {C.shape}; expected "
                                                         f"[k, {self.n_out}]")
        if not np.isfinite(C).all():
            raise self.cfg.error("specification.matrix", "C contains NaN or inf")
        return torch.as_tensor(C, dtype=self.dtype, device=self.device)

    def predict(self, x: Tensor) -> Tensor:
        """Outputs ``f(x)``: ``[N, *input_shape] -> [N, n_out]`` (no gradient)."""
        with torch.no_grad():
            return self.forward(x.to(self.device, self.dtype))

    def margins_spec(self, label: int, target: int | None = None) -> Spec:
        """Rows ``f_label - f_j`` for j != label (or j = target only)."""
        if not 0 <= label < self.n_out:
            raise InputError(f"label {label} is not an output index (the model has "
                             f"{self.n_out} outputs)")
        others = [j for j in range(self.n_out) if j != label] if target is None else [target]
        if target is not None and (target == label or not 0 <= target < self.n_out):
            raise InputError(f"target {target} must be an output index other than the label "
                             f"{label}")
        eye = torch.eye(self.n_out, dtype=self.dtype, device=self.device)
        C = eye[label][None] - eye[others]
        return Spec(C, [f"y{label}-y{j}" for j in others], "margins")

    def spec(self, label: int | None) -> Spec:
        """The rows of ``specification.output`` for an input with this label."""
        kind = self.cfg["specification"]["output"]
        if kind == "all":
            eye = torch.eye(self.n_out, dtype=self.dtype, device=self.device)
            return Spec(eye, [f"y{j}" for j in range(self.n_out)], "all")
        if kind == "matrix":
            return Spec(self._matrix, [f"row{i}" for i in range(self._matrix.shape[0])], "matrix")
        if label is None:
            raise InputError("margins need a label and this input has none")
        return self.margins_spec(label, self.cfg["specification"]["target"])

    # -- regions -----------------------------------------------------------------------------

    def ball(self, x0: Tensor, eps: float) -> Region:
        """``B_p(x0, eps)`` with the configured norm; ``x0: [*input_shape]``."""
        return self.bounder.region(x0[None], float(eps), self.norm_name)

    def region(self, x0: Tensor, box: tuple[Tensor, Tensor] | None = None,
               eps: float | None = None) -> Region:
        """The configured region around ``x0``: a ball, or a box (the given VNN-LIB box, else
        ``[x0 - eps, x0 + eps]`` clipped to ``specification.domain``)."""
        spec = self.cfg["specification"]
        eps = spec["eps"] if eps is None else eps
        if spec["region"] == "ball":
            return self.ball(x0, eps)
        if box is None:
            lo, hi = x0 - eps, x0 + eps
            if spec["domain"] is not None:
                lo = lo.clamp(spec["domain"][0], spec["domain"][1])
                hi = hi.clamp(spec["domain"][0], spec["domain"][1])
            box = (lo, hi)
        return self.bounder.region(lower=box[0][None], upper=box[1][None])

    def shells(self, x0: Tensor, radii: list[float]) -> list[Region]:
        """Regions containing ``B_p(x0, r)`` for each radius, in order (a region may hold a
        batch of several radii).

        For l_inf the radii go into one batch of boxes ``[x0 - r, x0 + r]`` (one box per region
        for models that take no batches), rounded outward by one ulp so that each box contains
        the ball; other norms give one ball per radius.
        """
        if not math.isinf(self.norm):
            return [self.ball(x0, r) for r in radii]
        if not self.batchable:
            return [self._boxes(x0, [r]) for r in radii]
        return [self._boxes(x0, radii)]

    def _boxes(self, x0: Tensor, radii: list[float]) -> Region:
        """A batch of boxes ``[x0 - r, x0 + r]`` ``[len(radii), *input_shape]``."""
        r = torch.tensor(radii, dtype=self.dtype, device=self.device)
        r = r.reshape(-1, *([1] * len(self.input_shape)))
        inf = torch.full_like(x0[None] + r, math.inf)
        lo = torch.nextafter(x0[None] - r, -inf)
        hi = torch.nextafter(x0[None] + r, inf)
        return self.bounder.region(lower=lo, upper=hi)

    # -- bounds ------------------------------------------------------------------------------

    def bound(self, region: Region, C: Tensor | None = None, method: str | None = None
              ) -> JacobianBounds:
        """Jacobian bounds of ``C f`` over ``region`` with the ``bounds``/``jacobian`` sections."""
        b, j = self.cfg["bounds"], self.cfg["jacobian"]
        extra: dict[str, Any] = {}
        if j["max_elements"] is not None:
            extra["max_elements"] = j["max_elements"]
        return self.bounder.bound(region, preact=b["method"], method=method or j["method"], C=C,
                                  alpha_iterations=b["alpha_iterations"],
                                  alpha_lr=b["alpha_lr"], intersect=j["intersect"], **extra)

    def output_lower(self, x0: Tensor, eps: float, C: Tensor, method: str) -> Tensor:
        """auto_LiRPA's lower bound of ``C f(x)`` over ``B_p(x0, eps)``: ``[k]``."""
        b = self.cfg["bounds"]
        ptb = make_perturbation(self.norm, float(eps))
        lb, _ = self.bounder.graph.output_bounds(x0[None].to(self.device, self.dtype), ptb,
                                                 C[None], method, b["alpha_iterations"],
                                                 b["alpha_lr"])
        return lb[0]
