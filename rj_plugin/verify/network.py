r"""The network of one instance, prepared once: a float64 torch model that takes batches.

VNN-COMP ONNX files often fix the batch size to 1 (ACAS Xu's ``Flatten`` is traced by
auto_LiRPA into ``Reshape(x, [1, 5])``), so auto_LiRPA's graph of the converted model only
bounds one box per call.  :func:`batch_preserving` replaces every ``nn.Flatten(1, -1)`` (and
onnx2pytorch's ``Flatten(axis=1)``) by a reshape to ``[-1, n]`` with the flat size ``n``
recorded on an example, which traces to a ``Reshape`` that keeps the batch dimension.  The
rewrite is accepted only when the new model, on a batch, agrees with the old one evaluated one
point at a time (up to float64 rounding, ``<= 1e-9 (1 + |y|)``); the old one is itself checked
against onnxruntime on the original file (up to float32 rounding).  Otherwise the original model
is kept and batches are bounded one box at a time.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rj_plugin.errors import ModelLoadError
from rj_plugin.models import load_model
from rj_plugin.verify.witness import OnnxChecker


class _BatchFlatten(nn.Module):
    """``x: [B, *s] -> [B, n]`` with ``n = prod(s)`` fixed at construction (traces to
    ``Reshape(x, [-1, n])``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = int(n)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.n)


def _flattens_after_batch(mod: nn.Module) -> bool:
    """``nn.Flatten(1, -1)`` or onnx2pytorch's ONNX ``Flatten(axis=1)``: ``[B, *s] -> [B, n]``."""
    if isinstance(mod, nn.Flatten):
        return mod.start_dim == 1 and mod.end_dim == -1
    return (type(mod).__name__ == "Flatten" and type(mod).__module__.startswith("onnx2pytorch")
            and getattr(mod, "start_dim", None) == 1)


def batch_preserving(model: nn.Module, example: Tensor) -> nn.Module | None:
    """A copy of ``model`` whose ``nn.Flatten(1, -1)`` layers keep the batch dimension when
    traced, or None when there is nothing to rewrite.  ``example``: ``[1, *input_shape]``."""
    sizes: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if _flattens_after_batch(mod):
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: sizes.__setitem__(name, math.prod(out.shape[1:]))))
    if not hooks:
        return None
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    new = copy.deepcopy(model)
    for name, n in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, _BatchFlatten(n))
    return new


@dataclass
class Network:
    """One instance's network.

    Attributes:
        model: float64 torch model, ``[B, *input_shape] -> [B, n_out]`` (batch-preserving
            rewrite when it was validated).
        input_shape: one input's shape (no batch), ``prod = n_inputs``.
        n_inputs, n_outputs: flat sizes.
        checker: onnxruntime on the original file.
        rewritten: whether the batch-preserving rewrite is in use.
        max_gap: the largest |torch - onnxruntime| output gap seen at the validation points.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    n_inputs: int
    n_outputs: int
    checker: OnnxChecker
    rewritten: bool
    max_gap: float

    def __call__(self, x_flat: Tensor) -> Tensor:
        """``f(x)`` for flat inputs ``[N, n_inputs]`` -> ``[N, n_outputs]`` (float64)."""
        return self.model(x_flat.reshape(-1, *self.input_shape)).reshape(x_flat.shape[0], -1)


def load_network(onnx_path: str | Path, device: str = "cpu",
                 probe: tuple[np.ndarray, np.ndarray] | None = None) -> Network:
    """Load ``onnx_path`` for verification (see the module docstring).

    Args:
        probe: ``(lower, upper)`` flat float64: validation points are drawn from this box
            (default: [-1, 1]^n).

    Raises:
        ModelLoadError: unreadable file, or torch and onnxruntime disagree beyond float32
            rounding (the bounds would be of another network).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    checker = OnnxChecker(path)
    model = load_model(path, dtype=torch.float64, device=device)
    shape = getattr(model, "rj_input_shape", None)
    if shape is None:
        raise ModelLoadError(f"{path}: the input shape is unknown")
    shape = tuple(int(s) for s in shape)
    n_in = math.prod(shape)
    example = torch.zeros(1, *shape, dtype=torch.float64, device=device)
    with torch.no_grad():
        n_out = int(model(example).numel())
    gen = np.random.default_rng(0)
    lo, hi = -np.ones(n_in), np.ones(n_in)
    if probe is not None and np.size(probe[0]) == n_in:  # else the caller reports the mismatch
        lo, hi = np.asarray(probe[0]).reshape(-1), np.asarray(probe[1]).reshape(-1)
    pts = lo + gen.random((4, n_in)) * (hi - lo)
    pts_t = torch.as_tensor(pts.astype(checker.input_dtype).astype(np.float64), device=device)
    with torch.no_grad():
        singles = torch.cat([model(p.reshape(1, *shape)).reshape(1, -1) for p in pts_t])
    ref = np.stack([checker.evaluate(p) for p in pts_t.cpu().numpy()])
    gap = float(np.max(np.abs(singles.cpu().numpy() - ref)))
    tol = 1e-4 * (1 + float(np.max(np.abs(ref))))
    if not gap <= tol:
        raise ModelLoadError(f"{path}: the converted torch model differs from onnxruntime by "
                             f"{gap:.3g} (tolerance {tol:.3g}); refusing to bound it")
    rewritten = False
    new = batch_preserving(model, example)
    if new is not None:
        with torch.no_grad():
            try:
                batched = new(pts_t.reshape(-1, *shape)).reshape(len(pts_t), -1)
            except RuntimeError:
                batched = None
        if batched is not None and bool(
                ((batched - singles).abs() <= 1e-9 * (1 + singles.abs())).all()):
            model, rewritten = new, True
    return Network(model.eval(), shape, n_in, n_out, checker, rewritten, gap)
