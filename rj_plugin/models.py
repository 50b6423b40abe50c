"""Loading networks: ONNX files, pickled PyTorch modules, and the bundled demo MLPs.

Every loader returns an ``nn.Module`` in eval mode that maps a batch ``[B, *input_shape]`` to
``[B, n_outputs]`` (ONNX models whose input has no batch dimension are wrapped so that they do).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rj_plugin.errors import ModelLoadError

__all__ = [
    "DEMO_MODELS",
    "Arctan",
    "UnbatchedOnnxWrapper",
    "build_mlp",
    "demo_model_path",
    "input_shape",
    "load_model",
]

#: Demo model name -> file name inside ``rj_plugin/models/``.
DEMO_MODELS: dict[str, str] = {
    "digits-relu": "digits_relu.pt",
    "digits-tanh": "digits_tanh.pt",
}

_MODEL_DIR = Path(__file__).resolve().parent / "models"

#: Keys of the ``"arch"`` dict of a demo ``.pt`` file that are passed on to :func:`build_mlp`.
_MLP_ARGS = ("in_features", "hidden", "out_features", "activation", "leaky_slope")

ModelSource = str | Path | nn.Module


class Arctan(nn.Module):
    """Element-wise ``atan``: ``[*] -> [*]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``torch.atan`` element-wise; the output has the shape of ``x``."""
        return torch.atan(x)


def _activation(name: str, leaky_slope: float) -> nn.Module:
    """Return a fresh activation module for ``name`` (see :func:`build_mlp`)."""
    factories: dict[str, Any] = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope=leaky_slope),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "arctan": Arctan,
        "softplus": nn.Softplus,
        "elu": nn.ELU,
    }
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(factories)}")
    return factories[name]()


def build_mlp(
    in_features: int,
    hidden: list[int],
    out_features: int,
    activation: str,
    leaky_slope: float = 0.01,
) -> nn.Sequential:
    """Build ``Flatten, (Linear, act) * len(hidden), Linear``.

    The network maps ``[B, *s]`` with ``prod(s) == in_features`` to ``[B, out_features]``.
    ``activation`` is one of relu, leaky_relu (slope ``leaky_slope``), tanh, sigmoid, arctan,
    softplus, elu.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(in_features)
    for h in hidden:
        layers.append(nn.Linear(width, int(h)))
        layers.append(_activation(activation, leaky_slope))
        width = int(h)
    layers.append(nn.Linear(width, int(out_features)))
    return nn.Sequential(*layers)


class UnbatchedOnnxWrapper(nn.Module):
    """Give a converted ONNX model whose input has no batch dimension a batch dimension.

    ``inner`` maps one sample ``[*sample_shape]`` to ``[*out]``; this module maps
    ``[B, *sample_shape]`` to ``[B, *out]``.  When ``broadcasts`` is true (checked at load time:
    the inner model already treats a leading dimension as a batch, as pure Linear/ReLU nets do),
    the batch is passed through in one call; otherwise the samples are evaluated one by one.
    """

    def __init__(self, inner: nn.Module, sample_shape: tuple[int, ...], broadcasts: bool) -> None:
        super().__init__()
        self.inner = inner
        self.sample_shape = tuple(sample_shape)
        self.broadcasts = bool(broadcasts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate ``x: [B, *sample_shape]`` and return ``[B, *out]``."""
        if self.broadcasts:
            return self.inner(x)
        return torch.stack([self.inner(x[i]) for i in range(x.shape[0])])


def demo_model_path(name: str) -> Path:
    """Path of the ``.pt`` file of the demo model ``name`` (a key of :data:`DEMO_MODELS`)."""
    if name not in DEMO_MODELS:
        raise ModelLoadError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    return _MODEL_DIR / DEMO_MODELS[name]


def _resolve(source: str | Path) -> Path:
    """Map a demo name or a path to an existing file path, or raise ``ModelLoadError``."""
    if isinstance(source, str) and source in DEMO_MODELS:
        path = demo_model_path(source)
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: demo model file missing (run scripts/train_digits.py to create it)"
            )
        return path
    path = Path(source)
    if not path.exists():
        known = ", ".join(DEMO_MODELS)
        hint = "" if path.suffix else f" (and not a demo model name: {known})"
        raise ModelLoadError(f"{path}: no such file{hint}")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    if path.suffix.lower() not in (".onnx", ".pt", ".pth"):
        raise ModelLoadError(f"{path}: unknown model file extension {path.suffix!r}")
    return path


def _onnx_dims(path: Path) -> tuple[list[int | str | None], str]:
    """Read the dims of the single graph input of an ONNX file (int, symbolic name or None)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # corrupt protobuf, permission error, ...
        raise ModelLoadError(f"{path}: cannot read ONNX file: {_one_line(exc)}") from exc
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: expected one graph input, found {len(inputs)}")
    dims: list[int | str | None] = []
    for d in inputs[0].type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return dims, inputs[0].name


def _split_batch(dims: list[int | str | None]) -> tuple[bool, tuple[int, ...] | None]:
    """Decide whether the ONNX input has a batch dimension; return ``(has_batch, sample_shape)``.

    Rank <= 1 inputs have no batch dimension; otherwise a leading dim that is 1, symbolic or
    unknown is the batch.  ``sample_shape`` is None when a non-batch dim is not a fixed integer.
    """
    if len(dims) >= 2 and (dims[0] is None or isinstance(dims[0], str) or dims[0] == 1):
        rest = dims[1:]
        has_batch = True
    else:
        rest = dims
        has_batch = False
    if all(isinstance(d, int) and d > 0 for d in rest):
        return has_batch, tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return has_batch, None


def _one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, squeezed onto one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _value_ranks(proto: Any) -> dict[str, int]:
    """Rank of every graph input and inferred intermediate value of an ONNX model, by name
    (values whose shape ONNX shape inference cannot determine are missing)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is best effort: unknown ranks are simply missing
        inferred = proto
    graph = inferred.graph
    ranks: dict[str, int] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    return ranks


def _rewrite_weight_first_matmuls(proto: Any, path: Path) -> int:
    """Rewrite ``MatMul(W, v)`` (W a rank-2 initializer ``[m, n]``, v a rank-1 value ``[n]``) as
    ``MatMul(v, W^T)`` in place; return the number of rewritten nodes.

    onnx2pytorch converts a MatMul with an initializer operand to ``nn.Linear`` computing
    ``x @ W`` whichever side the initializer is on, so ``W @ v`` (the VNN-COMP nets without a
    batch dimension, e.g. ``test_small.onnx``) became ``v @ W``: a shape error for non-square W,
    and silently ``W^T v`` for square W.  For a vector v, ``W @ v == v @ W^T`` exactly (both
    ``[m]``), and ``MatMul(v, W^T)`` is converted to ``Linear`` with weight ``W``.  A
    weight-first MatMul whose other operand is not a vector (or of unknown rank), or whose
    initializer is not a matrix, cannot be rewritten this way and raises ``ModelLoadError``
    rather than handing back a different function.
    """
    from onnx import numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    weight_first = [n for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) == 2
                    and n.input[0] in initializers and n.input[1] not in initializers]
    if not weight_first:
        return 0
    ranks = _value_ranks(proto)
    names = {t.name for t in proto.graph.initializer} | {
        v for n in proto.graph.node for v in (*n.input, *n.output)}
    transposed: dict[str, str] = {}
    for node in weight_first:
        weight, value = node.input[0], node.input[1]
        w_rank, v_rank = len(initializers[weight].dims), ranks.get(value)
        if w_rank != 2 or v_rank != 1:
            raise ModelLoadError(
                f"{path}: MatMul node {node.name or node.output[0]!r} multiplies the constant "
                f"{weight!r} (rank {w_rank}) by {value!r} (rank "
                f"{'unknown' if v_rank is None else v_rank}) from the left; only a matrix "
                f"times a vector can be converted (onnx2pytorch would compute {value} @ {weight})"
            )
        if weight not in transposed:
            new_name = f"{weight}_rj_transposed"
            while new_name in names:
                new_name += "_"
            names.add(new_name)
            matrix = numpy_helper.to_array(initializers[weight])
            proto.graph.initializer.append(numpy_helper.from_array(matrix.T.copy(), new_name))
            transposed[weight] = new_name
        node.input[0], node.input[1] = value, transposed[weight]
    return len(weight_first)


def _load_onnx(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Convert an ONNX file with onnx2pytorch; return ``(float32 module, sample_shape)``.

    Weight-first ``MatMul(W, x)`` nodes are rewritten first (see
    :func:`_rewrite_weight_first_matmuls`); a model whose input has no batch dimension is wrapped
    in :class:`UnbatchedOnnxWrapper` (``[B, *sample_shape] -> [B, *out]``).
    """
    dims, _ = _onnx_dims(path)
    has_batch, sample_shape = _split_batch(dims)
    import onnx
    from onnx2pytorch import ConvertModel  # slow import (torchvision): only when needed

    # ConvertModel mutates the ModelProto it is given (a second conversion of the same proto
    # loses the biases), so always convert a freshly loaded copy.
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read ONNX file: {_one_line(exc)}") from exc
    _rewrite_weight_first_matmuls(proto, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ConvertModel(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: onnx2pytorch cannot convert it: {_one_line(exc)}") from exc
    converted.eval()
    if sample_shape is None:
        return converted, None
    model: nn.Module = converted
    try:
        with torch.no_grad():
            probe = torch.rand((2, *sample_shape), generator=torch.Generator().manual_seed(0))
            if has_batch:
                model(probe[:1])
            else:
                singles = torch.stack([converted(p) for p in probe])
                try:
                    batched = converted(probe)
                    broadcasts = batched.shape == singles.shape and torch.allclose(
                        batched, singles, rtol=1e-5, atol=1e-6
                    )
                except Exception:  # the inner model rejects a leading batch dimension
                    broadcasts = False
                model = UnbatchedOnnxWrapper(converted, sample_shape, broadcasts)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: the converted model fails on an input of shape {list(sample_shape)}: "
            f"{_one_line(exc)}"
        ) from exc
    return model, sample_shape


def _load_pt(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Load a pickled ``nn.Module`` or an ``{"arch", "state_dict"}`` dict; return shape too."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read PyTorch file: {_one_line(exc)}") from exc
    if isinstance(obj, nn.Module):
        shape = getattr(obj, "rj_input_shape", None)
        return obj, tuple(shape) if shape is not None else None
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:
        arch = obj["arch"]
        if not isinstance(arch, dict):
            raise ModelLoadError(f"{path}: 'arch' must be a dict, got {type(arch).__name__}")
        try:
            model = build_mlp(**{k: arch[k] for k in _MLP_ARGS if k in arch})
            model.load_state_dict(obj["state_dict"])
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot rebuild the MLP: {_one_line(exc)}") from exc
        shape = arch.get("input_shape")
        return model, tuple(int(s) for s in shape) if shape is not None else None
    raise ModelLoadError(
        f"{path}: expected a pickled nn.Module or a dict with 'arch' and 'state_dict', "
        f"got {type(obj).__name__}"
    )


def _load_file(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Dispatch on the extension of an existing file."""
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    return _load_pt(path)


def load_model(
    source: ModelSource,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a network for bound computation.

    ``source`` is an ``nn.Module`` (returned as is, in eval mode, cast to ``dtype``/``device``),
    a demo name (``"digits-relu"``, ``"digits-tanh"``), or a path to ``.onnx``/``.pt``/``.pth``.
    The result maps ``[B, *input_shape(source)]`` to ``[B, n_outputs]``, is in eval mode, and has
    floating parameters/buffers of ``dtype`` on ``device``.  When the input shape is known it is
    stored as the attribute ``rj_input_shape``.  Raises ``ModelLoadError`` on any failure.
    """
    if isinstance(source, nn.Module):
        return source.to(device=device, dtype=dtype).eval()
    if not isinstance(source, str | Path):
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")
    path = _resolve(source)
    model, shape = _load_file(path)
    model = model.to(device=device, dtype=dtype).eval()
    if shape is not None:
        model.rj_input_shape = tuple(shape)
    return model


def input_shape(model_source: ModelSource) -> tuple[int, ...] | None:
    """Per-sample input shape (without the batch dim) of a model source, or None if unknown.

    For ONNX files it comes from the graph input (e.g. ``(1, 1, 5)`` for ACAS Xu, ``(784, 1)``
    for mnist_fc); for demo ``.pt`` files from ``arch["input_shape"]``; for modules returned by
    :func:`load_model` from their ``rj_input_shape`` attribute.
    """
    if isinstance(model_source, nn.Module):
        shape = getattr(model_source, "rj_input_shape", None)
        return tuple(shape) if shape is not None else None
    path = _resolve(model_source)
    if path.suffix.lower() == ".onnx":
        dims, _ = _onnx_dims(path)
        return _split_batch(dims)[1]
    return _load_pt(path)[1]
