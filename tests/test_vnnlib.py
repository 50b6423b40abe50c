"""VNN-LIB parser: the VNN-COMP benchmark files, inline specs and error cases."""

from __future__ import annotations

import csv
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from rj_plugin.errors import InputError
from rj_plugin.io.vnnlib import parse_vnnlib, read_counterexample, read_vnnlib

SHARED = Path(__file__).resolve().parents[2] / "shared"
VNNCOMP = SHARED / "data" / "vnncomp"
needs_vnncomp = pytest.mark.skipif(
    not VNNCOMP.is_dir(), reason=f"VNN-COMP data not available at {VNNCOMP}"
)

# Every vnnlib of these folders is parsed (they are small); the MNIST folders (784 inputs, ~50 ms
# a file) are sampled.
FULL_FOLDERS = ["acasxu", "test", "tllverifybench", "reach_prob_density"]
SAMPLED_FOLDERS = {"mnist_fc": 4, "eran": 3}

DECL = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
DECL += "(declare-const Y_1 Real)\n(declare-const Y_2 Real)\n"
BOX = "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 2))\n(assert (>= X_1 -2))\n"


@cache
def _onnx_io_sizes(path: Path) -> tuple[int, int]:
    """Number of scalars of one sample of the ONNX input and output (batch dim excluded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def size(value_info: onnx.ValueInfoProto) -> int:
        dims = [
            d.dim_value if d.HasField("dim_value") else 1
            for d in value_info.type.tensor_type.shape.dim
        ]
        return math.prod(dims)

    (inp,) = [i for i in model.graph.input if i.name not in inits]
    (out,) = model.graph.output
    return size(inp), size(out)


def _instances() -> list[tuple[str, Path, Path]]:
    """``(benchmark, onnx, vnnlib)`` for every distinct vnnlib of the selected folders."""
    rows: list[tuple[str, Path, Path]] = []
    if not VNNCOMP.is_dir():
        return rows
    for bench in FULL_FOLDERS + list(SAMPLED_FOLDERS):
        folder = VNNCOMP / bench
        seen: dict[Path, Path] = {}
        with (folder / "instances.csv").open(newline="") as fh:
            for onnx_rel, vnnlib_rel, *_ in csv.reader(fh):
                seen.setdefault(folder / vnnlib_rel.strip(), folder / onnx_rel.strip())
        items = sorted(seen.items())
        if bench in SAMPLED_FOLDERS:
            items = items[:: max(1, len(items) // SAMPLED_FOLDERS[bench])]
        rows.extend((bench, onnx, vnnlib) for vnnlib, onnx in items)
    return rows


@needs_vnncomp
def test_benchmark_vnnlib_files_parse() -> None:
    instances = _instances()
    assert len(instances) > 50
    for _, onnx_path, vnnlib_path in instances:
        spec = read_vnnlib(vnnlib_path)
        n_in, n_out = _onnx_io_sizes(onnx_path)
        assert (spec.n_inputs, spec.n_outputs) == (n_in, n_out), vnnlib_path
        assert spec.input_boxes and spec.output_constraints
        for lo, hi in spec.input_boxes:
            assert lo.shape == hi.shape == (n_in,)
            assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)
        for c, d in spec.output_constraints:
            assert c.ndim == 2 and c.shape[1] == n_out and d.shape == (c.shape[0],)


@needs_vnncomp
def test_acasxu_property_6_has_two_boxes_and_four_disjuncts() -> None:
    spec = read_vnnlib(VNNCOMP / "acasxu" / "vnnlib" / "prop_6.vnnlib")
    assert len(spec.input_boxes) == 2
    (lo0, hi0), (lo1, hi1) = spec.input_boxes
    assert hi0[1] == pytest.approx(0.499999896) and lo1[1] == pytest.approx(-0.499999896)
    assert len(spec.output_constraints) == 4
    c, d = spec.output_constraints[0]  # Y_1 <= Y_0
    np.testing.assert_array_equal(c, [[-1.0, 1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(d, [0.0])


@needs_vnncomp
def test_mnist_fc_output_disjunction() -> None:
    spec = read_vnnlib(VNNCOMP / "mnist_fc" / "vnnlib" / "prop_1_0.03.vnnlib")
    assert spec.n_inputs == 784 and len(spec.input_boxes) == 1
    assert len(spec.output_constraints) == 9
    for c, d in spec.output_constraints:  # (>= Y_j Y_label): Y_label - Y_j <= 0
        assert c.shape == (1, 10) and d.tolist() == [0.0]
        assert sorted(c[0].tolist()) == [-1.0] + [0.0] * 8 + [1.0]


@needs_vnncomp
def test_test_benchmark_mixed_conjunction() -> None:
    # test_small: (or (and (>= X_0 -1) (<= X_0 1) (>= Y_0 100)))
    spec = read_vnnlib(VNNCOMP / "test" / "vnnlib" / "test_small.vnnlib")
    assert [(lo.tolist(), hi.tolist()) for lo, hi in spec.input_boxes] == [([-1.0], [1.0])]
    ((c, d),) = spec.output_constraints
    assert c.tolist() == [[-1.0]] and d.tolist() == [-100.0]


def test_inline_spec_semantics() -> None:
    text = (
        DECL
        + BOX
        + (
            "; a comment (with parentheses\n"
            "(assert (or (and (<= Y_0 Y_1) (>= Y_2 0.5)) (and (< 3 Y_1))))\n"
            "(assert (<= Y_0 (- 1.5e0)))\n"
        )
    )
    spec = parse_vnnlib(text, source="inline.vnnlib")
    assert (spec.n_inputs, spec.n_outputs) == (2, 3)
    ((lo, hi),) = spec.input_boxes
    assert lo.tolist() == [0.0, -2.0] and hi.tolist() == [1.0, 2.0]
    (c0, d0), (c1, d1) = spec.output_constraints
    # the plain conjunct Y_0 <= -1.5 comes first in every disjunct
    assert c0.tolist() == [[1, 0, 0], [1, -1, 0], [0, 0, -1]] and d0.tolist() == [-1.5, 0, -0.5]
    assert c1.tolist() == [[1, 0, 0], [0, -1, 0]] and d1.tolist() == [-1.5, -3.0]
    assert spec.unsafe_index(np.array([-2.0, 0.0, 1.0])) == 0
    assert spec.unsafe_index(np.array([-2.0, 4.0, 0.0])) == 1
    assert spec.unsafe_index(np.array([0.0, 4.0, 0.0])) is None
    assert spec.input_index(np.array([0.5, 2.0])) == 0
    assert spec.input_index(np.array([0.5, 2.1])) is None


def test_input_disjunction_and_constant_on_the_left() -> None:
    text = DECL + (
        "(assert (or (and (<= X_0 1) (>= X_0 0) (<= 0 X_1) (>= 1 X_1))\n"
        "            (and (<= X_0 5) (>= X_0 4) (<= X_1 0) (>= X_1 -1))\n"
        "            (and (<= X_0 5) (>= X_0 6) (<= X_1 0) (>= X_1 -1))))\n"  # empty: dropped
        "(assert (<= Y_2 Y_2))\n"
    )
    spec = parse_vnnlib(text)
    assert [(lo.tolist(), hi.tolist()) for lo, hi in spec.input_boxes] == [
        ([0.0, 0.0], [1.0, 1.0]),
        ([4.0, -1.0], [5.0, 0.0]),
    ]
    ((c, d),) = spec.output_constraints  # no real output constraint: everything is unsafe
    assert c.shape == (0, 3) and d.shape == (0,)
    assert spec.unsafe_index(np.zeros(3)) == 0


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 2))\n", 2, "X_1 is unbounded"),
        (BOX + "(assert (<= Y_7 1))\n", 10, "Y_7 is not declared"),
        (BOX + "(assert (= Y_0 1))\n", 10, "unsupported operator '='"),
        (BOX + "(assert (<= (+ Y_0 Y_1) 1))\n", 10, "unsupported term"),
        (BOX + "(assert (<= X_0 Y_1))\n", 10, "Y only"),
        (BOX + "(assert (<= Y_0 foo))\n", 10, "unknown symbol 'foo'"),
        (BOX + "(assert (<= Y_0 1)\n", 10, "never closed"),
        (BOX + "(check-sat)\n", 10, "unsupported command"),
        (
            BOX + "(assert (or (and (<= X_0 0.5) (<= Y_0 1)) (and (>= X_0 0.5) (<= Y_1 1))))\n",
            10,
            "coupled",
        ),
        (
            "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 0))\n(assert (>= X_1 1))\n",
            9,
            "input set is empty",
        ),
    ],
)
def test_inline_errors_name_file_and_line(body: str, line: int, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        parse_vnnlib(DECL + body, source="spec.vnnlib")
    message = str(info.value)
    assert message.startswith(f"spec.vnnlib:{line}:"), message
    assert fragment in message


def test_declaration_errors() -> None:
    with pytest.raises(InputError, match="X_0 is not declared but X_1 is"):
        parse_vnnlib("(declare-const X_1 Real)\n(declare-const Y_0 Real)\n")
    with pytest.raises(InputError, match="declared twice"):
        parse_vnnlib("(declare-const X_0 Real)\n(declare-const X_0 Real)\n")
    with pytest.raises(InputError, match="unsupported type 'Int'"):
        parse_vnnlib("(declare-const X_0 Int)\n")
    with pytest.raises(InputError, match="no output variable"):
        parse_vnnlib("(declare-const X_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="absent.vnnlib"):
        read_vnnlib(tmp_path / "absent.vnnlib")
    with pytest.raises(InputError, match="absent.counterexample"):
        read_counterexample(tmp_path / "absent.counterexample")


def test_read_counterexample(tmp_path: Path) -> None:
    path = tmp_path / "a.counterexample"
    path.write_text("((X_1 0.25)\n(X_0 -1e-3)\n(Y_0 7))\n")
    x, y = read_counterexample(path)
    assert x.tolist() == [-1e-3, 0.25] and y.tolist() == [7.0]
    path.write_text("((X_0 0.25)\n(X_2 1)\n(Y_0 7))\n")
    with pytest.raises(InputError, match="not 0..n-1"):
        read_counterexample(path)
    path.write_text("((X_0 0.25)\n(Z_0 1))\n")
    with pytest.raises(InputError, match=r"a.counterexample:2: expected"):
        read_counterexample(path)
