r"""Counterexample re-checks against onnxruntime on the ORIGINAL ONNX file.

A candidate ``x`` (float64, from the torch model) becomes a witness only when

1. ``x`` is rounded to the ONNX input's element type (float32 for most VNN-COMP nets), and the
   rounded value, read back in float64, lies in one of the vnnlib input boxes at tolerance 0
   (a coordinate that rounding pushed out of its box is moved one ulp of the input type back
   inside, when such a value exists);
2. onnxruntime evaluates the file at that exact input, and the output ``y`` read in float64
   satisfies every row of some unsafe disjunct, ``C y <= d``, at tolerance 0.

The returned witness is ``(x, y)``: ``x`` flat in C order (what was fed to onnxruntime, as
float64), ``y`` flat (onnxruntime's output as float64).  Nothing from the torch model itself
reaches the verdict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rj_plugin.errors import ModelLoadError
from rj_plugin.io.vnnlib import VnnlibSpec

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16}


class OnnxChecker:
    """An onnxruntime session on the original ONNX file.

    Args:
        onnx_path: the competition's ONNX file.

    Attributes:
        input_shape: the ONNX input's full shape (batch included when the graph has one).
        input_dtype: the numpy type onnxruntime takes (float32 for most networks).
        n_inputs, n_outputs: flat sizes of one input and one output.
    """

    def __init__(self, onnx_path: str | Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{onnx_path}: onnxruntime cannot load it: "
                                 f"{' '.join(str(exc).split())[:200]}") from exc
        inputs = [i for i in self.session.get_inputs()]
        if len(inputs) != 1:
            raise ModelLoadError(f"{onnx_path}: expected one graph input, found "
                                 f"{[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        if inputs[0].type not in _ORT_TYPES:
            raise ModelLoadError(f"{onnx_path}: unsupported input type {inputs[0].type}")
        self.input_dtype = _ORT_TYPES[inputs[0].type]
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else 1
                                 for d in inputs[0].shape)
        self.n_inputs = int(np.prod(self.input_shape))
        self.output_name = self.session.get_outputs()[0].name

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """onnxruntime's output at one input ``x`` (``n_inputs`` values, already of the input
        type or exactly representable in it): flat float64 ``[n_outputs]``."""
        feed = np.asarray(x).astype(self.input_dtype).reshape(self.input_shape)
        (y,) = self.session.run([self.output_name], {self.input_name: feed})
        return np.asarray(y, dtype=np.float64).reshape(-1)

    def representable_in_box(self, x: np.ndarray, lower: np.ndarray, upper: np.ndarray
                             ) -> np.ndarray | None:
        """``x`` (float64 ``[n]``) rounded to the input type and moved into ``[lower, upper]``;
        returned as float64 exactly equal to the values fed to onnxruntime, or None when some
        coordinate has no representable value inside its interval."""
        t = self.input_dtype
        xr = np.clip(np.asarray(x, dtype=np.float64), lower, upper).astype(t)
        low = xr.astype(np.float64) < lower
        xr[low] = np.nextafter(xr[low], t(np.inf))
        high = xr.astype(np.float64) > upper
        xr[high] = np.nextafter(xr[high], t(-np.inf))
        back = xr.astype(np.float64)
        if np.any(back < lower) or np.any(back > upper) or not np.all(np.isfinite(back)):
            return None
        return back


def violation(spec_rows: tuple[np.ndarray, np.ndarray], y: np.ndarray) -> float:
    """``max_i (C y - d)_i`` of one disjunct (<= 0 means ``y`` is unsafe); -inf for k = 0."""
    c, d = spec_rows
    if c.shape[0] == 0:
        return -np.inf
    return float(np.max(c @ y - d))


def recheck(checker: OnnxChecker, spec: VnnlibSpec, candidates: np.ndarray,
            limit: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
    """The first candidate that is a witness on onnxruntime (see the module docstring).

    Args:
        candidates: ``[N, n_inputs]`` float64, best first; at most ``limit`` are checked.

    Returns:
        ``(x, y)`` flat float64 arrays, or None.
    """
    boxes = spec.input_boxes
    for x in np.asarray(candidates, dtype=np.float64).reshape(len(candidates), -1)[:limit]:
        # the box nearest to x (x lies in it for candidates from the search)
        gaps = [float(np.sum(np.maximum(lo - x, 0) + np.maximum(x - hi, 0))) for lo, hi in boxes]
        lower, upper = boxes[int(np.argmin(gaps))]
        xr = checker.representable_in_box(x, lower, upper)
        if xr is None:
            continue
        y = checker.evaluate(xr)
        if not np.all(np.isfinite(y)):
            continue
        if spec.input_index(xr, tol=0.0) is not None and \
                spec.unsafe_index(y, tol=0.0) is not None:
            return xr.copy(), y.copy()
    return None
