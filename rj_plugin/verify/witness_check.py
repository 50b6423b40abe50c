"""Independent re-check of a ``sat`` witness with onnxruntime on the original ONNX file.

This is the front end's own check (used by ``rj score`` and by ``rj verify`` before it writes
``sat``); it shares only the onnxruntime session (:class:`~rj_plugin.verify.witness.OnnxChecker`)
with the verifier's search.  A witness ``(x, y)`` is accepted when

1. ``x`` has one value per ``X_i`` of the property and lies, at tolerance 0, in one of its
   input boxes (compared in float64, as written in the file);
2. onnxruntime evaluates the model at ``x`` (cast to the ONNX input's element type, reshaped to
   its input shape with dynamic dimensions set to 1), and the output, read as float64, lies in
   one of the property's unsafe polyhedra ``C y <= d`` at tolerance 0.

The ``y`` written in the witness is not trusted: only its largest difference from the recomputed
output is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rj_plugin.errors import InputError, ModelLoadError
from rj_plugin.io.vnnlib import VnnlibSpec, read_vnnlib
from rj_plugin.verify.witness import OnnxChecker

__all__ = ["WitnessCheck", "check_witness"]

@dataclass
class WitnessCheck:
    """The outcome of :func:`check_witness`.

    Attributes:
        ok: the witness is valid.
        reason: why not (empty when ``ok``).
        box: index of the input box holding ``x`` (None if none).
        disjunct: index of the unsafe disjunct holding the recomputed output (None if none).
        y: the output recomputed by onnxruntime (float64, flat), when it could be computed.
        y_diff: largest ``|y_witness - y|`` (None without a written ``y`` or a size mismatch).
        margin: ``min over disjuncts of max_k (C y - d)_k``: <= 0 exactly when ``y`` is unsafe.
    """

    ok: bool
    reason: str = ""
    box: int | None = None
    disjunct: int | None = None
    y: np.ndarray | None = field(default=None, repr=False)
    y_diff: float | None = None
    margin: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the output vector)."""
        return {"ok": self.ok, "reason": self.reason, "box": self.box,
                "disjunct": self.disjunct, "y_diff": self.y_diff, "margin": self.margin}


@lru_cache(maxsize=8)
def _checker(onnx_path: str) -> OnnxChecker:
    """A cached onnxruntime session of ``onnx_path`` (see :class:`OnnxChecker`).

    Raises:
        ModelLoadError: the file is missing or onnxruntime cannot load it.
    """
    if not Path(onnx_path).is_file():
        raise ModelLoadError(f"{onnx_path}: model file not found")
    return OnnxChecker(onnx_path)


def _evaluate(onnx_path: str, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output at ``x`` (flat float64 in, flat float64 out)."""
    checker = _checker(onnx_path)
    if checker.n_inputs != x.size:
        raise InputError(f"the witness has {x.size} inputs; {onnx_path} takes "
                         f"{checker.n_inputs} (shape {list(checker.input_shape)})")
    return checker.evaluate(x)


def check_witness(onnx_path: str | Path, vnnlib: str | Path | VnnlibSpec, x: Any,
                  y: Any | None = None) -> WitnessCheck:
    """Re-check the witness ``x`` (and the written output ``y``, reported only) of a ``sat``
    answer on ``onnx_path`` against the property ``vnnlib`` (a path or a parsed spec).

    Returns a :class:`WitnessCheck`; problems with the witness itself (wrong size, outside the
    box, safe output) are ``ok=False`` with a reason.

    Raises:
        ModelLoadError: the model cannot be loaded by onnxruntime.
        InputError: the property file cannot be read.
    """
    spec = vnnlib if isinstance(vnnlib, VnnlibSpec) else read_vnnlib(vnnlib)
    xf = np.asarray(x, dtype=np.float64).reshape(-1)
    if xf.size != spec.n_inputs:
        return WitnessCheck(False, f"the witness has {xf.size} inputs, the property declares "
                                   f"{spec.n_inputs}")
    if not np.all(np.isfinite(xf)):
        return WitnessCheck(False, "the witness input is not finite")
    box = spec.input_index(xf, tol=0.0)
    if box is None:
        excess = min(float(np.max(np.maximum(lo - xf, xf - hi)))
                     for lo, hi in spec.input_boxes)
        return WitnessCheck(False, f"x is outside every input box (by {excess:.3g} at least)")
    try:
        y_model = _evaluate(str(onnx_path), xf)
    except InputError as exc:
        return WitnessCheck(False, str(exc), box=box)
    if y_model.size != spec.n_outputs:
        return WitnessCheck(False, f"the model has {y_model.size} outputs, the property "
                                   f"declares {spec.n_outputs}", box=box, y=y_model)
    y_diff = None
    if y is not None:
        yw = np.asarray(y, dtype=np.float64).reshape(-1)
        if yw.size == y_model.size:
            y_diff = float(np.max(np.abs(yw - y_model)))
    margins = [float(np.max(c @ y_model - d)) if len(d) else -math.inf
               for c, d in spec.output_constraints]
    margin = min(margins) if margins else math.inf
    disjunct = spec.unsafe_index(y_model, tol=0.0)
    if disjunct is None:
        return WitnessCheck(False, f"the recomputed output is not in the unsafe set (margin "
                                   f"{margin:.6g} > 0)", box=box, y=y_model, y_diff=y_diff,
                            margin=margin)
    return WitnessCheck(True, "", box=box, disjunct=disjunct, y=y_model, y_diff=y_diff,
                        margin=margin if math.isfinite(margin) else None)
