"""Atomic result files: JSON conversion, and no partial files when writing fails."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rj_plugin.io.results import (
    atomic_write_json,
    atomic_write_text,
    package_versions,
    to_jsonable,
)


@dataclass
class _Record:
    name: str
    bounds: torch.Tensor


def test_text_roundtrip_and_parent_creation(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(target, "second")
    assert target.read_text(encoding="utf-8") == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_json_converts_arrays_tensors_and_nonfinite(tmp_path: Path) -> None:
    obj = {
        "t": torch.tensor([[1.0, float("nan")], [float("inf"), -2.5]], dtype=torch.float64),
        "a": np.arange(3, dtype=np.int64),
        "s": np.float32(0.5),
        "f": -math.inf,
        "nested": [(1, 2), {3: Path("x/y")}],
        "rec": _Record("r", torch.zeros(2)),
        "flag": np.bool_(True),
    }
    path = atomic_write_json(tmp_path / "r.json", obj)
    text = path.read_text()
    assert "NaN," not in text and "Infinity," not in text.replace('"Infinity"', "")
    back = json.loads(text)  # strict JSON
    assert back["t"] == [[1.0, "NaN"], ["Infinity", -2.5]]
    assert back["a"] == [0, 1, 2] and back["s"] == 0.5 and back["f"] == "-Infinity"
    assert back["nested"] == [[1, 2], {"3": "x/y"}]
    assert back["rec"] == {"name": "r", "bounds": [0.0, 0.0]}
    assert back["flag"] is True
    assert float(back["t"][1][0]) == math.inf


def test_failed_serialisation_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    bad = {"ok": list(range(1000)), "later": {"deep": [1, 2, object()]}}
    with pytest.raises(TypeError, match="object"):
        atomic_write_json(target, bad)
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed rewrite untouched
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, bad)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_while_writing_removes_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    # a lone surrogate cannot be encoded as UTF-8: the write fails after the temp file exists
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "x" * 100_000 + "\ud800")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_to_jsonable_rejects_unknown_types() -> None:
    with pytest.raises(TypeError, match="complex"):
        to_jsonable({"z": 1j})


def test_package_versions() -> None:
    versions = package_versions()
    assert set(versions) == {"python", "torch", "auto_LiRPA", "onnx2pytorch", "numpy", "rj_plugin"}
    assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__
    assert versions["python"].count(".") == 2
