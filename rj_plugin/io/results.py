"""Writing result files atomically, and recording the versions that produced them."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write_json", "atomic_write_text", "package_versions", "to_jsonable"]

#: JSON spelling of non-finite floats (strict JSON has none; ``float()`` parses these back).
_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``.  Readers see the old file or the complete new one; on failure nothing changes.
    Creates missing parent folders.  Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON types.

    Tensors and numpy arrays (any shape) become nested lists, numpy/torch scalars numbers, tuples
    and sets lists, paths strings, dataclasses dicts, enums their value; non-finite floats become
    the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.  Raises ``TypeError`` for anything else.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else _NONFINITE[repr(value)]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Serialise ``obj`` (see :func:`to_jsonable`) to strict JSON and write it atomically.

    The whole document is built before anything touches the disk, so a serialisation error
    leaves neither a partial file nor a temporary one behind.  Returns the path."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _version(dist: str) -> str | None:
    """Installed version of the distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages a result depends on (None when not installed).

    auto_LiRPA is looked up in the installed metadata only, never imported."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "auto_LiRPA": _version("auto_LiRPA") or _version("auto-LiRPA"),
        "onnx2pytorch": _version("onnx2pytorch"),
        "numpy": np.__version__,
        "rj_plugin": _version("rj_plugin") or _version("rj-plugin"),
    }
