"""Model loading: demo MLPs, pickled modules, ONNX files checked against VNN-COMP witnesses."""

from __future__ import annotations

import csv
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rj_plugin.data import load_digits_split
from rj_plugin.errors import ModelLoadError, RJError
from rj_plugin.io.vnnlib import VnnlibSpec, read_counterexample, read_vnnlib
from rj_plugin.models import (
    DEMO_MODELS,
    Arctan,
    UnbatchedOnnxWrapper,
    build_mlp,
    demo_model_path,
    input_shape,
    load_model,
)
from tests import oracle

SHARED = Path(__file__).resolve().parents[2] / "shared"
VNNCOMP = SHARED / "data" / "vnncomp"
needs_vnncomp = pytest.mark.skipif(
    not VNNCOMP.is_dir(), reason=f"VNN-COMP data not available at {VNNCOMP}"
)

# A few nets per benchmark keep this file at a few seconds; ACAS Xu nets are chosen so that their
# witnesses cover properties 2, 3, 4, 7 and 8.
ONNX_NETS = [
    ("acasxu", "ACASXU_run2a_1_2_batch_2000.onnx"),
    ("acasxu", "ACASXU_run2a_1_9_batch_2000.onnx"),
    ("acasxu", "ACASXU_run2a_2_9_batch_2000.onnx"),
    ("mnist_fc", "mnist-net_256x2.onnx"),
    ("mnist_fc", "mnist-net_256x4.onnx"),
    ("mnist_fc", "mnist-net_256x6.onnx"),
    ("eran", "ffnnSIGMOID__Point_6x200.onnx"),
    ("eran", "mnist_relu_9_200.onnx"),
    ("test", "test_sat.onnx"),
    ("test", "test_unsat.onnx"),
    ("test", "test_nano.onnx"),
    ("test", "test_tiny.onnx"),
    ("test", "test_small.onnx"),
    ("tllverifybench", "tllBench_n=2_N=M=8_m=1_instance_0_0.onnx"),
    ("reach_prob_density", "gcas.onnx"),
    ("reach_prob_density", "robot.onnx"),
    ("reach_prob_density", "vdp.onnx"),
]


# ------------------------------------------------------------------------------------------------
# demo models and building blocks


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_model_accuracy_matches_record(name: str) -> None:
    model = load_model(name)
    assert not model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    record = torch.load(demo_model_path(name), map_location="cpu", weights_only=False)
    assert record["trained_by"] == "scripts/train_digits.py"
    assert record["arch"]["input_shape"] == [64]
    x, y = load_digits_split("test")
    assert x.shape == (360, 64) and y.shape == (360,)
    with torch.no_grad():
        acc = float((model(x).argmax(dim=1) == y).double().mean())
    assert acc > 0.9
    # float64 evaluation of float32 weights may flip at most a borderline sample
    assert abs(acc - record["test_accuracy"]) <= 1.5 / 360
    assert input_shape(name) == (64,)
    assert input_shape(model) == (64,)


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_model_loads_identically_twice(name: str) -> None:
    x, _ = load_digits_split("test")
    with torch.no_grad():
        assert torch.equal(load_model(name)(x), load_model(name)(x))


def test_digits_split_is_stratified_and_scaled() -> None:
    x_train, y_train = load_digits_split("train", dtype=torch.float32)
    x_test, y_test = load_digits_split("test", dtype=torch.float32)
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert x_train.dtype == torch.float32 and y_test.dtype == torch.long
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert torch.bincount(y_test, minlength=10).min() >= 35
    with pytest.raises(RJError):
        load_digits_split("validation")


@pytest.mark.parametrize(
    "activation", ["relu", "leaky_relu", "tanh", "sigmoid", "arctan", "softplus", "elu"]
)
def test_build_mlp_structure(activation: str) -> None:
    net = build_mlp(12, [7, 5], 3, activation, leaky_slope=0.2)
    assert isinstance(net[0], nn.Flatten)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 7), (7, 5), (5, 3)]
    assert len(net) == 1 + 2 * 2 + 1
    assert net(torch.randn(4, 3, 4)).shape == (4, 3)
    if activation == "leaky_relu":
        assert net[2].negative_slope == 0.2


def test_build_mlp_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="gelu"):
        build_mlp(4, [3], 2, "gelu")


def test_arctan_is_atan() -> None:
    x = torch.linspace(-5, 5, 11)
    assert torch.equal(Arctan()(x), torch.atan(x))


def test_module_source_is_returned_in_eval_mode() -> None:
    net = build_mlp(4, [3], 2, "tanh").train()
    out = load_model(net)
    assert out is net and not out.training
    assert next(out.parameters()).dtype == torch.float64
    assert input_shape(net) is None


def test_pickled_module_and_dtype(tmp_path: Path) -> None:
    net = build_mlp(6, [5], 2, "elu")
    torch.save(net, tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", dtype=torch.float32)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))


def test_arch_dict_roundtrip(tmp_path: Path) -> None:
    net = build_mlp(6, [4, 4], 3, "leaky_relu", leaky_slope=0.1)
    arch = {
        "in_features": 6,
        "hidden": [4, 4],
        "out_features": 3,
        "activation": "leaky_relu",
        "leaky_slope": 0.1,
        "input_shape": [2, 3],
    }
    torch.save({"arch": arch, "state_dict": net.state_dict()}, tmp_path / "m.pth")
    loaded = load_model(str(tmp_path / "m.pth"))
    assert input_shape(tmp_path / "m.pth") == (2, 3)
    assert loaded.rj_input_shape == (2, 3)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net.double()(x))


def test_load_errors(tmp_path: Path) -> None:
    cases: list[tuple[Path | str, str]] = [(tmp_path / "absent.onnx", "no such file")]
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    cases.append((bad_onnx, "cannot read ONNX"))
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_text("not a pickle")
    cases.append((bad_pt, "cannot read PyTorch"))
    odd = tmp_path / "model.h5"
    odd.write_text("x")
    cases.append((odd, "extension"))
    bare = tmp_path / "bare.pt"
    torch.save(build_mlp(2, [], 1, "relu").state_dict(), bare)
    cases.append((bare, "'arch'"))
    wrong = tmp_path / "wrong.pt"
    arch = {"in_features": 3, "hidden": [], "out_features": 1, "activation": "relu"}
    torch.save({"arch": arch, "state_dict": build_mlp(2, [], 1, "relu").state_dict()}, wrong)
    cases.append((wrong, "rebuild"))
    cases.append(("digits-gelu", "demo model"))
    cases.append((tmp_path, "not a regular file"))
    for source, fragment in cases:
        with pytest.raises(ModelLoadError) as info:
            load_model(source)
        message = str(info.value)
        assert fragment in message, message
        assert "\n" not in message
        if isinstance(source, Path):
            assert str(source) in message


# ------------------------------------------------------------------------------------------------
# ONNX files from VNN-COMP


@cache
def _witnesses(bench: str) -> tuple[tuple[str, Path, Path], ...]:
    """``(onnx name, vnnlib path, counterexample path)`` of every witness row of ``bench``."""
    folder = VNNCOMP / bench
    out = []
    for csv_path in sorted(folder.glob("known_results*.csv")):
        suffix = csv_path.stem.removeprefix("known_results")  # "" or "_2021"
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row["confidence"] != "witness":
                    continue
                onnx_path, vnnlib_path = Path(row["onnx"]), Path(row["vnnlib"])
                name = f"{onnx_path.stem}__{vnnlib_path.stem}.counterexample"
                cex = folder / f"counterexamples{suffix}" / name
                out.append((onnx_path.name, folder / vnnlib_path, cex))
    return tuple(out)


@cache
def _spec(path: Path) -> VnnlibSpec:
    return read_vnnlib(path)


@needs_vnncomp
@pytest.mark.parametrize(("bench", "net"), ONNX_NETS, ids=[n for _, n in ONNX_NETS])
def test_onnx_matches_witnesses_and_reloads_identically(bench: str, net: str) -> None:
    path = VNNCOMP / bench / "onnx" / net
    model = load_model(path)
    shape = input_shape(path)
    assert shape is not None and model.rj_input_shape == shape
    assert not model.training
    assert all(
        t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point()
    )

    # the mutation trap: a second conversion must give the same function (biases included)
    x = torch.rand((4, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y1 = model(x)
        y2 = load_model(path)(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(4)])
    assert torch.equal(y1, y2)
    assert y1.shape[0] == 4 and torch.allclose(y1, singles, atol=1e-12)

    rows = [w for w in _witnesses(bench) if w[0] == net]
    for _, vnnlib_path, cex_path in rows:
        assert cex_path.is_file(), f"witness file missing: {cex_path}"
        cx, cy = read_counterexample(cex_path)
        spec = _spec(vnnlib_path)
        assert cx.size == spec.n_inputs == int(np.prod(shape))
        assert cy.size == spec.n_outputs
        with torch.no_grad():
            out = model(torch.as_tensor(cx).reshape(1, *shape)).reshape(-1).numpy()
        np.testing.assert_allclose(out, cy, atol=1e-4, err_msg=str(cex_path))
        assert spec.input_index(cx, tol=1e-9) is not None, f"{cex_path}: X outside input set"
        assert spec.unsafe_index(cy, tol=1e-9) is not None, f"{cex_path}: Y not unsafe"
        # and our own output is unsafe too, up to the conversion tolerance
        assert spec.unsafe_index(out, tol=1e-4) is not None


@needs_vnncomp
def test_onnx_input_shapes_and_unbatched_wrapper() -> None:
    acas = VNNCOMP / "acasxu" / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"
    assert input_shape(acas) == (1, 1, 5)
    assert input_shape(VNNCOMP / "mnist_fc" / "onnx" / "mnist-net_256x2.onnx") == (784, 1)
    assert input_shape(VNNCOMP / "eran" / "onnx" / "mnist_relu_9_200.onnx") == (1, 28, 28)
    tll = VNNCOMP / "tllverifybench" / "onnx" / "tllBench_n=2_N=M=8_m=1_instance_0_0.onnx"
    assert input_shape(tll) == (2,)  # symbolic batch dimension
    nano = VNNCOMP / "test" / "onnx" / "test_nano.onnx"
    assert input_shape(nano) == (1,)  # no batch dimension at all
    model = load_model(nano)
    assert isinstance(model, UnbatchedOnnxWrapper)
    x = torch.tensor([[-2.0], [0.0], [3.0]], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), torch.tensor([[0.0], [0.0], [1.5]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Weight-first MatMul (W @ x on an input without a batch dimension, e.g. test_small.onnx)


def _numpy_onnx(path: Path, sample: np.ndarray) -> np.ndarray:
    """Evaluate an ONNX graph of MatMul / Add / Sub / Relu / Flatten nodes on one sample with
    numpy in float64, independently of onnx2pytorch (ONNX's MatMul is numpy's ``matmul``).

    ``sample`` has the shape of the ONNX graph input (batch dimension included where it has one).
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    env = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    (name,) = [i.name for i in proto.graph.input if i.name not in env]
    env[name] = sample.astype(np.float64)
    for node in proto.graph.node:
        args = [env[i] for i in node.input]
        if node.op_type == "MatMul":
            out = np.matmul(args[0], args[1])
        elif node.op_type == "Add":
            out = args[0] + args[1]
        elif node.op_type == "Sub":
            out = args[0] - args[1]
        elif node.op_type == "Relu":
            out = np.maximum(args[0], 0.0)
        elif node.op_type == "Flatten":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            out = args[0].reshape(int(np.prod(args[0].shape[:axis])), -1)
        else:
            pytest.fail(f"reference evaluator: unexpected op {node.op_type} in {path}")
        env[node.output[0]] = out
    return env[proto.graph.output[0].name]


def _onnx_input_dims(path: Path) -> tuple[int, ...]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    (inp,) = [i for i in proto.graph.input if i.name not in inits]
    return tuple(max(d.dim_value, 1) for d in inp.type.tensor_type.shape.dim)


def _matmul_onnx(tmp_path: Path, weight: np.ndarray, x_dims: list[int], name: str) -> Path:
    """A one-node ONNX model ``Y = MatMul(W, X)`` with W an initializer (weight first)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_dims = list(np.matmul(weight, np.zeros(x_dims)).shape)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["W", "X"], ["Y"], name="weight_first")], name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_dims)],
        [numpy_helper.from_array(weight.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_weight_first_matmul_of_a_vector_is_w_times_x(tmp_path: Path) -> None:
    """onnx2pytorch turns MatMul(W, x) into x @ W: a shape error for a non-square W and, worse,
    silently W^T x for a square one.  The loader rewrites it to MatMul(x, W^T) (exact for a
    vector x), so both compute W @ x, batched."""
    gen = np.random.default_rng(0)
    for name, weight in (("square", np.array([[1.0, 2.0], [-3.0, 0.5]])),
                         ("wide", gen.standard_normal((3, 2)))):
        path = _matmul_onnx(tmp_path, weight, [2], name)
        model = load_model(path)
        assert model.rj_input_shape == (2,) and input_shape(path) == (2,)
        x = torch.as_tensor(gen.standard_normal((5, 2)))
        with torch.no_grad():
            y = model(x)
        w32 = weight.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(y.numpy(), x.numpy() @ w32.T, rtol=1e-12, atol=1e-12)
        jac = oracle.jacobians(model, x).detach()
        assert torch.equal(jac, torch.as_tensor(w32).expand(5, -1, -1))


def test_weight_first_matmul_of_a_matrix_is_refused(tmp_path: Path) -> None:
    """W @ X with X a matrix cannot be rewritten as X @ W^T: refused (onnx2pytorch alone
    silently computed X @ W here), not converted wrongly."""
    path = _matmul_onnx(tmp_path, np.array([[1.0, 2.0], [-3.0, 0.5]]), [2, 2], "matrix")
    with pytest.raises(ModelLoadError, match="from the left") as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


TEST_NETS = ["test_small.onnx", "test_tiny.onnx", "test_nano.onnx", "test_sat.onnx",
             "test_unsat.onnx"]


@needs_vnncomp
@pytest.mark.parametrize("net", TEST_NETS)
def test_competition_test_nets_load_and_match_the_onnx_graph(net: str) -> None:
    """Every net of the competition's overhead check loads and computes its ONNX graph
    (a numpy evaluation of the graph at random points), batched."""
    path = VNNCOMP / "test" / "onnx" / net
    model = load_model(path)
    shape = model.rj_input_shape
    x = torch.rand((6, *shape), dtype=torch.float64,
                   generator=torch.Generator().manual_seed(2)) * 8 - 4
    with torch.no_grad():
        y = model(x)
    dims = _onnx_input_dims(path)
    ref = np.stack([_numpy_onnx(path, xi.numpy().reshape(dims)).reshape(-1) for xi in x])
    assert y.shape[0] == 6
    np.testing.assert_allclose(y.reshape(6, -1).numpy(), ref, rtol=1e-9, atol=1e-9)


@needs_vnncomp
def test_test_small_loads_with_a_batch_axis_and_gets_exact_jacobian_bounds() -> None:
    """test_small.onnx: x [1] -> W2 relu(W1 relu(W0 x + b0) + b1) + b2, no batch dimension.
    Its derivative is 0 for x < -1.5 and 3 * 2 * (2 + 2) = 24 for x > -1.5.  Loaded with a
    batch axis ([B, 1] -> [B, 1]), its Jacobian bounds contain the true Jacobians (torch.func)
    at random points and the ends of each interval, and are exact (up to the bounds' outward
    rounding) where the interval avoids the kink."""
    from rj_plugin import bound_jacobian

    path = VNNCOMP / "test" / "onnx" / "test_small.onnx"
    model = load_model(path)
    assert isinstance(model, UnbatchedOnnxWrapper)
    assert model.rj_input_shape == (1,) and input_shape(path) == (1,)
    gen = torch.Generator().manual_seed(3)
    centers = torch.tensor([[-3.0], [-1.5], [-1.2], [0.0], [0.9]], dtype=torch.float64)
    with torch.no_grad():
        assert model(centers).shape == (5, 1)
    for eps, exact in ((0.1, [0.0, None, 24.0, 24.0, 24.0]), (1.0, [0.0, None, None, 24.0, 24.0])):
        for method in ("recurjac", "fastlip", "interval"):
            jb = bound_jacobian(model, centers, eps=eps, method=method)
            assert jb.lower.shape == jb.upper.shape == (5, 1, 1)
            for b in range(5):
                pts = torch.cat([centers[b] + eps * torch.tensor([[-1.0], [0.0], [1.0]]),
                                 oracle.random_points(centers[b], eps, math.inf, 200, gen)])
                jac = oracle.jacobians(model, pts).detach()
                assert (jac >= jb.lower[b] - 1e-12).all() and (jac <= jb.upper[b] + 1e-12).all()
                if exact[b] is not None:
                    assert abs(float(jb.lower[b]) - exact[b]) < 1e-9
                    assert abs(float(jb.upper[b]) - exact[b]) < 1e-9
                else:  # the interval contains the kink: both slopes are attained
                    assert float(jb.lower[b]) <= 0.0 and float(jb.upper[b]) >= 24.0


@needs_vnncomp
@pytest.mark.parametrize("net", TEST_NETS)
def test_competition_test_nets_match_onnxruntime(net: str) -> None:
    """The loaded nets against onnxruntime (the competition's reference), where installed."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    path = VNNCOMP / "test" / "onnx" / net
    model = load_model(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    dims = _onnx_input_dims(path)
    x = torch.rand((4, *model.rj_input_shape), dtype=torch.float64,
                   generator=torch.Generator().manual_seed(4)) * 8 - 4
    with torch.no_grad():
        y = model(x).reshape(4, -1).numpy()
    for i in range(4):
        (out,) = session.run(None, {feed.name: x[i].numpy().reshape(dims).astype(np.float32)})
        np.testing.assert_allclose(y[i], out.reshape(-1), rtol=1e-4, atol=1e-4)
