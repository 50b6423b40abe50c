"""The inputs of a run: the ``data`` section turned into a list of :class:`InputItem`.

Sources:

* ``digits``: the bundled scikit-learn digits (``[64]`` points in [0, 1], labels 0..9);
* ``npz``: an ``.npz`` with arrays ``x_key`` ``[N, *input_shape]`` and optionally ``y_key`` ``[N]``,
  or an ``.npy`` of points only;
* ``vnnlib``: one item per input box of each file; the point is the box's midpoint, the box is
  kept (``specification.region: box`` uses it), and the label is read off the output constraints
  when they are the usual classification property "some Y_j >= Y_c" (every disjunct one row
  ``Y_c - Y_j <= 0`` with the same c);
* ``random``: ``num_points`` uniform points in ``[low, high]`` (seed ``general.seed``).

The selection (``start``/``end`` or ``indices``) is applied to that list.  Points without a label
are given the model's prediction as label (recorded as ``label_source: predicted``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rj_plugin.config import RunConfig
from rj_plugin.errors import ConfigError, InputError


@dataclass
class InputItem:
    """One input of a run.

    Attributes:
        position: index in the run's list.
        identity: where it came from (JSON-friendly), e.g. ``{"source": "digits", "split":
            "test", "index": 7}``.
        x: the point ``[*input_shape]`` (for a VNN-LIB box: its midpoint).
        label: the label from the data, or None.
        box: ``(lower, upper)`` ``[*input_shape]`` each, for VNN-LIB inputs.
    """

    position: int
    identity: dict[str, Any]
    x: Tensor
    label: int | None = None
    box: tuple[Tensor, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _select(cfg: RunConfig, n: int, what: str) -> list[int]:
    data = cfg["data"]
    if data["indices"] is not None:
        bad = [i for i in data["indices"] if i >= n]
        if bad:
            raise cfg.error("data.indices", f"index {bad[0]} out of range: {what} has {n} items")
        return list(data["indices"])
    start, end = data["start"], data["end"] if data["end"] is not None else n
    if start >= n:
        raise cfg.error("data.start", f"{start} out of range: {what} has {n} items")
    if end > n:
        raise cfg.error("data.end", f"{end} out of range: {what} has {n} items")
    return list(range(start, end))


def vnnlib_label(constraints: list[tuple[np.ndarray, np.ndarray]]) -> int | None:
    """The class c of a property "unsafe iff some Y_j >= Y_c", else None.

    ``constraints``: the unsafe disjuncts ``(C [k, n_out], d [k])`` of :mod:`rj_plugin.io.vnnlib`.
    """
    label = None
    for mat, rhs in constraints:
        if mat.shape[0] != 1 or float(abs(rhs).max(initial=0.0)) != 0.0:
            return None
        row = mat[0]
        pos, neg = np.flatnonzero(row > 0), np.flatnonzero(row < 0)
        if len(pos) != 1 or len(neg) != 1 or row[pos[0]] != 1 or row[neg[0]] != -1:
            return None
        if label is not None and label != int(pos[0]):
            return None
        label = int(pos[0])
    return label


def _as_points(arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """``[N, *shape]`` from ``[N, *shape]``, one point ``[*shape]``, or ``[N, prod(shape)]``."""
    if tuple(arr.shape[1:]) == shape:
        return arr
    if tuple(arr.shape) == shape:
        return arr[None]
    if arr.ndim >= 2 and math.prod(arr.shape[1:]) == math.prod(shape):
        return arr.reshape(len(arr), *shape)
    raise InputError(f"{where}: points of shape {tuple(arr.shape)} do not fit the model "
                     f"input {shape}")


def load_inputs(cfg: RunConfig, input_shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> list[InputItem]:
    """The selected inputs of the ``data`` section (see the module doc)."""
    data, source = cfg["data"], cfg["data"]["source"]
    shape = tuple(input_shape)
    items: list[InputItem] = []

    def tensor(a: Any) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(device)

    if source == "digits":
        from rj_plugin.data import load_digits_split

        if math.prod(shape) != 64:
            raise cfg.error("data.source", f"the digits are 64 pixels; the model takes {shape}")
        x, y = load_digits_split(data["split"], dtype=dtype)
        for i in _select(cfg, len(x), f"the digits {data['split']} split"):
            items.append(InputItem(len(items), {"source": "digits", "split": data["split"],
                                                "index": i},
                                   x[i].reshape(shape).to(device), int(y[i])))
    elif source == "random":
        gen = torch.Generator().manual_seed(cfg["general"]["seed"])
        pts = torch.rand(data["num_points"], *shape, dtype=dtype, generator=gen)
        pts = data["low"] + pts * (data["high"] - data["low"])
        for i in _select(cfg, len(pts), "the random points"):
            items.append(InputItem(len(items), {"source": "random", "seed":
                                                cfg["general"]["seed"], "index": i},
                                   pts[i].to(device)))
    elif source == "npz":
        path = Path(cfg.paths["data.path"][0])
        try:
            if path.suffix.lower() == ".npy":
                xs, ys = np.load(path, allow_pickle=False), None
            else:
                with np.load(path, allow_pickle=False) as archive:
                    if data["x_key"] not in archive:
                        raise cfg.error("data.x_key", f"{path.name} has no array "
                                                      f"{data['x_key']!r} (has "
                                                      f"{', '.join(archive.files)})")
                    xs = archive[data["x_key"]]
                    ys = archive[data["y_key"]] if data["y_key"] in archive else None
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read points: {exc}") from None
        xs = _as_points(xs, shape, str(path))
        if ys is not None and (ys.ndim != 1 or len(ys) != len(xs)):
            raise InputError(f"{path}: labels {data['y_key']!r} of shape {ys.shape} do not "
                             f"match {len(xs)} points")
        for i in _select(cfg, len(xs), str(path)):
            items.append(InputItem(len(items), {"source": "npz", "file": str(path), "index": i},
                                   tensor(xs[i]), None if ys is None else int(ys[i])))
    elif source == "vnnlib":
        from rj_plugin.io.vnnlib import read_vnnlib

        every: list[InputItem] = []
        for name in cfg.paths["data.path"]:
            spec = read_vnnlib(name)
            if spec.n_inputs != math.prod(shape):
                raise InputError(f"{name} declares {spec.n_inputs} inputs; the model takes "
                                 f"{shape}")
            label = vnnlib_label(spec.output_constraints)
            for j, (lo, hi) in enumerate(spec.input_boxes):
                lo_t, hi_t = tensor(lo).reshape(shape), tensor(hi).reshape(shape)
                every.append(InputItem(0, {"source": "vnnlib", "file": str(name), "box": j},
                                       (lo_t + hi_t) / 2, label, (lo_t, hi_t)))
        for i in _select(cfg, len(every), "the VNN-LIB boxes"):
            item = every[i]
            item.position = len(items)
            item.identity["index"] = i
            items.append(item)
    else:  # pragma: no cover - the schema allows nothing else
        raise ConfigError(f"unknown data source {source}")
    return items
