"""Writing result files atomically, and recording the versions that produced them."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import stat
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "new_file_mode",
    "package_versions",
    "to_jsonable",
]

#: JSON spelling of non-finite floats (strict JSON has none; ``float()`` parses these back).
_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _umask() -> int:
    """The process umask (read without changing it where ``/proc`` says it, else set back at
    once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``.  Readers see the old file or the complete new one; on failure nothing changes.
    Creates missing parent folders.  The file gets the permissions a plain ``open(path, "w")``
    would give it: those of the file it replaces, else ``0o666 & ~umask`` (not ``mkstemp``'s
    0600).  Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else new_file_mode()
    except OSError:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the folder a write would create under)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()  # pragma: no cover - a relative path's ancestors end at "."


def check_output_file(path: str | Path) -> str | None:
    """Why a result file cannot be written at ``path`` (None when it can), without writing.

    Checked: ``path`` is not a folder; the nearest existing ancestor folder is a folder (not a
    file) and writable.  Call this before any computation so that a bad output path fails fast.
    """
    target = Path(path)
    if str(path).endswith(("/", os.sep)) or target.is_dir():
        return f"{path} is a folder, not a file"
    if target.exists() and not target.is_file():
        return f"{path} exists and is not a regular file"
    parent = _first_existing(target.parent)
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created under it"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"folder {parent} is not writable"
    return None


def check_output_dir(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as a results folder (None when it can), without creating it.

    Checked: ``path`` is a writable folder, or does not exist and its nearest existing ancestor
    is a writable folder (not a file).
    """
    target = Path(path)
    existing = _first_existing(target)
    if existing == target and not target.is_dir():
        return f"{path} exists and is not a folder"
    if not existing.is_dir():
        return f"{existing} is a file, so the folder {path} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"folder {existing} is not writable"
    return None


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
