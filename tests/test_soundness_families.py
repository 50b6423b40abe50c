"""Soundness over families of networks that the plain-MLP sweeps never generate.

``tests/test_soundness.py`` only builds MLPs whose first operation is a Linear layer, with leaky
slopes below 1; ``tests/test_graphs.py`` only default-option convolutions and pooling.  Here a
generator builds, from a fixed seed per case (crc32 of the case name):

* preprocessing before the first layer: ``(x - mean) / std`` as a module, ``2 * x``, ``-3 * x``,
  ``x * w`` (a constant vector), a slice ``x[:, 1:]``, eval Dropout, an activation (tanh, ReLU,
  sigmoid, leaky ReLU 3) on the raw input, residual blocks ``x + g(x)`` / ``x - tanh(x W)`` on
  the raw input, eval BatchNorm on the raw input, a Flatten of an image input, an Unflatten of
  a vector into an image, AvgPool on the raw image, per-channel normalisation of an image;
* leaky ReLU with slopes 0, 0.3, 1, 1.5, 3 and -0.5 (the last is not monotone: a refusal is
  fine);
* Conv1d / Conv2d with padding int / 'valid' / 'same' (odd and even kernels, i.e. asymmetric
  implicit padding), padding_mode zeros / reflect / replicate / circular, dilation, stride,
  groups (incl. depthwise), bias off, 1x1 kernels, tuple kernel / stride / padding / dilation;
  each option on the input's convolution alone and on two convolutions;
* AvgPool1d / AvgPool2d with padding, count_include_pad True / False, ceil_mode True / False,
  overlapping windows, divisor_override, rectangular windows; eval BatchNorm (1-d and 2-d,
  affine or not, non-trivial running statistics);
* residual CNN blocks (identity skip, 1x1-conv projection skip, AvgPool skip, BatchNorm inside,
  on the raw image, 1-d);
* softplus and ELU (alpha <= 1) MLPs;

on l_1, l_2, l_inf balls and boxes (one degenerate coordinate), with one or two centers.  For
every pre-activation method and every bound method the true Jacobians (``tests/oracle.py``:
random points, points on the sphere / box surface, vertices, and gradient-ascent points on
entries and row dual norms when the net has a smooth activation) must lie in ``[lower, upper]``
(relative tolerance 1e-9, float64) and every sampled gradient-row dual norm under
``lipschitz()``.  A deliberate refusal (``UnsupportedLayerError`` / ``InputError`` whose message
names the operator) is accepted and reported as a warning (``RJ_STRICT_REFUSALS=1`` makes it a
failure); a raw exception (IndexError, RuntimeError, ...), a refusal that names no operator, or
NaN bounds are failures.  The graph is rebuilt after any exception, so that one failed call
cannot decide the next.  Separately, at eps = 0 (every norm, and a box lower = upper = x0) in
float32 and float64 the bounds of ReLU and tanh nets (MLP, normalised MLP, CNN, residual CNN)
must contain the autograd Jacobian at x0 (torch.func and plain per-row backward) bitwise.

All failures of a case (every preact x method) are collected into one message.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from rj_plugin.api import METHODS, JacobianBounder
from rj_plugin.errors import InputError, UnsupportedLayerError
from rj_plugin.lirpa import PREACT_METHODS
from tests import oracle

TOL = 1e-9  # relative tolerance of the sampled containment (float64), as in test_soundness.py
N_RANDOM = 250  # random points per center (plus as many on the sphere / box surface)
N_VERTICES = 128
ALPHA_ITERATIONS = 5
REGIONS = ("1", "2", "inf", "box")
_P = {"1": 1.0, "2": 2.0, "inf": math.inf, "box": math.inf}
# base radii per input kind; each case scales its own by 10**U(-0.3, 0.3)
_EPS = {"vec": {"1": 0.6, "2": 0.3, "inf": 0.12, "box": 0.12},
        "img": {"1": 0.6, "2": 0.25, "inf": 0.05, "box": 0.05}}

ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky": lambda: nn.LeakyReLU(0.2), "softplus": nn.Softplus, "elu": lambda: nn.ELU(0.5),
}
SMOOTH = (nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU)

# A refusal must name the operator it refuses (ONNX or torch spelling).
_OP_NAME = re.compile(
    r"\(op \w+\)|\b(conv\w*|\w*pool\w*|pad|batch\s?norm\w*|leaky[ _]?relu|relu|tanh|sigmoid|"
    r"elu|softplus|flatten|reshape|linear|gemm|matmul|add|sub|mul|div|slice|concat|gather|"
    r"transpose)\b", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# building blocks


class Normalize(nn.Module):
    """``(x - mean) / std`` with per-feature (or per-channel) buffers."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return self.factor * x


class Lambda(nn.Module):
    """A fixed function of the input (slices, elementwise products with constants, ...)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], **buffers: Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


class Residual(nn.Module):
    """``skip(x) + body(x)`` (identity skip when ``skip`` is None)."""

    def __init__(self, body: nn.Module, skip: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.skip = body, skip

    def forward(self, x: Tensor) -> Tensor:
        return (x if self.skip is None else self.skip(x)) + self.body(x)


def _mlp(d: int, out: int, act: str, widths=(7, 5)) -> list[nn.Module]:
    layers, prev = [], d
    for w in widths:
        layers += [nn.Linear(prev, w), ACTS[act]()]
        prev = w
    return layers + [nn.Linear(prev, out)]


def _with_head(features: nn.Module, shape: tuple[int, ...], act: str | None = None,
               out: int = 3) -> nn.Sequential:
    """features -> Flatten -> Linear(., out) [or Linear(., 6) -> act -> Linear(6, out)]."""
    with torch.no_grad():
        n = features(torch.zeros(1, *shape)).numel()
    head = [nn.Linear(n, out)] if act is None else [nn.Linear(n, 6), ACTS[act](),
                                                     nn.Linear(6, out)]
    return nn.Sequential(features, nn.Flatten(), *head)


def _bn_stats(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics (and affine parameters) for every BatchNorm."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.5)
            if m.affine:
                m.weight.data.uniform_(-1.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
    return net


def _conv(dim: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d}[dim]


def _pool(dim: int) -> type[nn.Module]:
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d}[dim]


def _bn(dim: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]


def _img(dim: int, channels: int, size: int) -> tuple[int, ...]:
    return (channels, size) if dim == 1 else (channels, size, size)


# ----------------------------------------------------------------------------------------------
# the generator: (name, builder () -> (net, input_shape), region)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, tuple[int, ...]]] = field(repr=False)
    region: str

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) % (2 ** 31)


def _preprocessing_cases() -> list[Case]:
    d, out = 4, 3

    def vec(first: Callable[[], nn.Module], act: str):
        return lambda: (nn.Sequential(first(), *_mlp(d, out, act)), (d,))

    firsts: dict[str, Callable[[], nn.Module]] = {
        "normalize": lambda: Normalize(torch.rand(d) - 0.5, 0.3 + torch.rand(d)),
        "scale2": lambda: Scale(2.0),
        "scale-3": lambda: Scale(-3.0),
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "leaky3": lambda: nn.LeakyReLU(3.0),
        "residual": lambda: Residual(nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, d))),
        "residual-relu": lambda: Residual(nn.Sequential(nn.Linear(d, 6), nn.ReLU(),
                                                        nn.Linear(6, d))),
        "batchnorm": lambda: _bn_stats(nn.BatchNorm1d(d)),
    }
    cases = []
    for i, (name, first) in enumerate(firsts.items()):
        for j, region in enumerate(REGIONS):
            act = ("relu", "tanh")[(i + j) % 2]
            cases.append(Case(f"pre-{name}-{act}-{region}", vec(first, act), region))
    # image inputs: Flatten first, AvgPool first, per-channel normalisation before a conv
    for j, region in enumerate(REGIONS):
        act = ("tanh", "relu")[j % 2]
        cases.append(Case(f"pre-flatten-{act}-{region}", (lambda act=act: (nn.Sequential(
            nn.Flatten(), *_mlp(18, out, act)), (2, 3, 3))), region))
        cases.append(Case(f"pre-avgpool2d-{act}-{region}", (lambda act=act: (_with_head(
            nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                       count_include_pad=False)), (1, 7, 7), act),
            (1, 7, 7))), region))
        cases.append(Case(f"pre-normalize-image-{act}-{region}", (lambda act=act: (_with_head(
            nn.Sequential(Normalize(torch.tensor([0.4, 0.6]).reshape(2, 1, 1),
                                    torch.tensor([0.25, 0.5]).reshape(2, 1, 1)),
                          nn.Conv2d(2, 3, 3, padding=1), ACTS[act]()), (2, 5, 5)),
            (2, 5, 5))), region))
    # fewer regions: a vector scale, a slice, a difference of branches, eval dropout, unflatten
    more: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
        "mulvec": lambda: (nn.Sequential(Lambda(lambda m, x: x * m.w, w=torch.randn(d)),
                                         *_mlp(d, out, "tanh")), (d,)),
        "slice": lambda: (nn.Sequential(Lambda(lambda m, x: x[:, 1:]),
                                        *_mlp(d - 1, out, "relu")), (d,)),
        "residual-sub": lambda: (nn.Sequential(
            Lambda(lambda m, x: x - torch.tanh(x @ m.w), w=torch.randn(d, d)),
            *_mlp(d, out, "relu")), (d,)),
        "dropout": lambda: (nn.Sequential(nn.Dropout(0.5), *_mlp(d, out, "tanh")), (d,)),
        "unflatten-conv": lambda: (_with_head(nn.Sequential(
            nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3), nn.ReLU()), (16,)), (16,)),
    }
    for i, (name, build) in enumerate(more.items()):
        for region in (REGIONS[i % 4], REGIONS[(i + 1) % 4]):
            cases.append(Case(f"pre-{name}-{region}", build, region))
    cases.append(Case("pre-avgpool1d-relu-inf", lambda: (_with_head(
        nn.AvgPool1d(2, ceil_mode=True), (1, 7), "relu"), (1, 7)), "inf"))
    cases.append(Case("pre-batchnorm2d-tanh-2", lambda: (_with_head(nn.Sequential(
        _bn_stats(nn.BatchNorm2d(2)), nn.Conv2d(2, 2, 3), nn.Tanh()), (2, 5, 5)), (2, 5, 5)),
        "2"))
    return cases


def _leaky_cases() -> list[Case]:
    cases = []
    for slope in (0.3, 1.5, 3.0, -0.5, 0.0, 1.0):
        for region in (REGIONS if slope not in (0.0, 1.0) else ("2", "box")):
            def build(slope=slope):
                layers = [nn.Linear(4, 7), nn.LeakyReLU(slope), nn.Linear(7, 6),
                          nn.LeakyReLU(slope), nn.Linear(6, 3)]
                return nn.Sequential(*layers), (4,)
            cases.append(Case(f"leaky{slope:g}-mlp-{region}", build, region))
    for slope, region in ((3.0, "inf"), (1.5, "2")):
        cases.append(Case(f"leaky{slope:g}-cnn-{region}", (lambda slope=slope: (_with_head(
            nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(slope),
                          nn.Conv2d(2, 2, 3, stride=2), nn.LeakyReLU(slope)), (1, 6, 6)),
            (1, 6, 6))), region))
    return cases


# Convolution options: kwargs for the conv under test (the same options on every conv of the net)
_CONV_OPTS: dict[str, dict] = {
    "pad1": {"kernel_size": 3, "padding": 1},
    "pad2": {"kernel_size": 3, "padding": 2},
    "valid": {"kernel_size": 3, "padding": "valid"},
    "same": {"kernel_size": 3, "padding": "same"},
    "same-even": {"kernel_size": 2, "padding": "same"},
    "same-dil2": {"kernel_size": 3, "padding": "same", "dilation": 2},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "replicate": {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
    "circular": {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    "same-reflect": {"kernel_size": 3, "padding": "same", "padding_mode": "reflect"},
    "dil2": {"kernel_size": 3, "padding": 2, "dilation": 2},
    "stride2": {"kernel_size": 3, "stride": 2, "padding": 1},
    "groups2": {"kernel_size": 3, "padding": 1, "groups": 2},
    "depthwise": {"kernel_size": 3, "padding": 1, "groups": 2, "depthwise": True},
    "nobias": {"kernel_size": 3, "padding": 1, "bias": False},
    "k1": {"kernel_size": 1},
}
_CONV2D_ONLY: dict[str, dict] = {
    "tuple": {"kernel_size": (2, 3), "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)},
    "same-rect": {"kernel_size": (2, 3), "padding": "same", "dilation": (2, 1)},
}


def _conv_cases() -> list[Case]:
    cases = []
    acts = ("relu", "tanh", "leaky", "sigmoid")
    for dim in (1, 2):
        opts = dict(_CONV_OPTS, **(_CONV2D_ONLY if dim == 2 else {}))
        for i, (name, kw) in enumerate(opts.items()):
            kw = dict(kw)
            depthwise = kw.pop("depthwise", False)
            grouped = "groups" in kw
            for two in (False, True):  # the option on the input's conv only / on two convs
                act = acts[(i + dim + 2 * two) % 4]
                region = REGIONS[(i + 2 * dim + 2 * two) % 4]

                def build(dim=dim, kw=kw, grouped=grouped, depthwise=depthwise, two=two,
                          act=act):
                    shape = _img(dim, 2 if grouped else 1, 8 if dim == 1 else 6)
                    c0 = shape[0]
                    c1 = c0 if depthwise else (4 if grouped else 3)
                    layers = [_conv(dim)(c0, c1, **kw), ACTS[act]()]
                    if two:
                        c2 = c1 if depthwise else 2
                        layers += [_conv(dim)(c1, c2, **kw), ACTS[act]()]
                    return _with_head(nn.Sequential(*layers), shape), shape

                cases.append(Case(f"conv{dim}d-{name}-{'2' if two else '1'}conv-{act}-{region}",
                                  build, region))
    return cases


_POOL_OPTS: dict[str, dict] = {
    "k2": {"kernel_size": 2},
    "k3s1p1-incl": {"kernel_size": 3, "stride": 1, "padding": 1, "count_include_pad": True},
    "k3s1p1-excl": {"kernel_size": 3, "stride": 1, "padding": 1, "count_include_pad": False},
    "k2-ceil": {"kernel_size": 2, "ceil_mode": True},
    "k3s2p1-ceil-excl": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                         "count_include_pad": False},
    "k3s2p1-ceil-incl": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                         "count_include_pad": True},
    "k2s1": {"kernel_size": 2, "stride": 1},
    "k3s2p1-excl": {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
    "k2p1-incl": {"kernel_size": 2, "padding": 1},
    "k2p1-ceil-excl": {"kernel_size": 2, "padding": 1, "ceil_mode": True,
                       "count_include_pad": False},
}


def _pool_cases() -> list[Case]:
    cases = []
    acts = ("relu", "tanh", "sigmoid", "leaky")
    for dim in (1, 2):
        opts = dict(_POOL_OPTS)
        if dim == 2:
            opts["divisor3"] = {"kernel_size": 2, "divisor_override": 3}
            opts["rect"] = {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 1),
                            "ceil_mode": True, "count_include_pad": False}
        for i, (name, kw) in enumerate(opts.items()):
            for k in (0, 2):
                act = acts[(i + dim + k) % 4]
                region = REGIONS[(i + dim + k) % 4]

                def build(dim=dim, kw=kw, act=act):
                    shape = _img(dim, 1, 7)
                    feats = nn.Sequential(_conv(dim)(1, 2, 3, padding=1), ACTS[act](),
                                          _pool(dim)(**kw))
                    return _with_head(feats, shape, act), shape

                cases.append(Case(f"avgpool{dim}d-{name}-{act}-{region}", build, region))
    return cases


def _batchnorm_cases() -> list[Case]:
    def mlp_bn():
        return _bn_stats(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                                       nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                       nn.Linear(5, 3))), (4,)

    def cnn_bn(dim: int, affine: bool, act: str):
        def build():
            shape = _img(dim, 1, 8 if dim == 1 else 6)
            feats = nn.Sequential(_conv(dim)(1, 3, 3, padding=1), _bn(dim)(3, affine=affine),
                                  ACTS[act](), _conv(dim)(3, 2, 3, stride=2),
                                  _bn(dim)(2, eps=1e-3, affine=affine), ACTS[act]())
            return _with_head(_bn_stats(feats), shape), shape
        return build

    return [Case("bn1d-mlp-inf", mlp_bn, "inf"), Case("bn1d-mlp-1", mlp_bn, "1"),
            Case("bn2d-cnn-relu-box", cnn_bn(2, True, "relu"), "box"),
            Case("bn2d-cnn-tanh-2", cnn_bn(2, True, "tanh"), "2"),
            Case("bn2d-noaffine-sigmoid-inf", cnn_bn(2, False, "sigmoid"), "inf"),
            Case("bn1d-conv1d-relu-1", cnn_bn(1, True, "relu"), "1"),
            Case("bn1d-conv1d-tanh-inf", cnn_bn(1, True, "tanh"), "inf")]


def _rescnn_cases() -> list[Case]:
    def identity(act: str, dim: int = 2):
        def build():
            shape = _img(dim, 1, 8 if dim == 1 else 6)
            C = _conv(dim)
            feats = nn.Sequential(C(1, 3, 3, padding=1), ACTS[act](),
                                  Residual(nn.Sequential(C(3, 3, 3, padding=1), ACTS[act](),
                                                         C(3, 3, 3, padding=1))), ACTS[act]())
            return _with_head(feats, shape), shape
        return build

    def projection(act: str):
        def build():
            feats = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), ACTS[act](),
                                  Residual(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1),
                                                         ACTS[act](), nn.Conv2d(3, 3, 1)),
                                           nn.Conv2d(2, 3, 1, stride=2, bias=False)),
                                  ACTS[act]())
            return _with_head(feats, (1, 6, 6)), (1, 6, 6)
        return build

    def pool_skip(act: str):
        def build():
            feats = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), ACTS[act](),
                                  Residual(nn.Sequential(nn.Conv2d(2, 2, 3, stride=2, padding=1),
                                                         ACTS[act]()), nn.AvgPool2d(2)),
                                  ACTS[act]())
            return _with_head(feats, (1, 6, 6)), (1, 6, 6)
        return build

    def bn_block(act: str):
        def build():
            feats = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), ACTS[act](),
                                  Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1),
                                                         nn.BatchNorm2d(2), ACTS[act](),
                                                         nn.Conv2d(2, 2, 3, padding=1),
                                                         nn.BatchNorm2d(2))), ACTS[act]())
            return _with_head(_bn_stats(feats), (1, 6, 6)), (1, 6, 6)
        return build

    def raw(act: str):
        def build():
            feats = nn.Sequential(
                Residual(nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), ACTS[act](),
                                       nn.Conv2d(3, 2, 3, padding="same"))),
                nn.Conv2d(2, 2, 3), ACTS[act]())
            return _with_head(feats, (2, 5, 5)), (2, 5, 5)
        return build

    return [Case("rescnn-identity-relu-inf", identity("relu"), "inf"),
            Case("rescnn-identity-tanh-1", identity("tanh"), "1"),
            Case("rescnn-projection-relu-2", projection("relu"), "2"),
            Case("rescnn-projection-tanh-box", projection("tanh"), "box"),
            Case("rescnn-poolskip-sigmoid-inf", pool_skip("sigmoid"), "inf"),
            Case("rescnn-batchnorm-relu-box", bn_block("relu"), "box"),
            Case("rescnn-raw-tanh-inf", raw("tanh"), "inf"),
            Case("rescnn-raw-relu-2", raw("relu"), "2"),
            Case("rescnn1d-identity-leaky-inf", identity("leaky", dim=1), "inf")]


def _extra_activation_cases() -> list[Case]:
    return [Case(f"mlp-{act}-{region}", (lambda act=act: (nn.Sequential(*_mlp(5, 3, act)), (5,))),
                 region) for act, region in (("softplus", "inf"), ("elu", "2"), ("elu", "box"))]


CASES = (_preprocessing_cases() + _leaky_cases() + _conv_cases() + _pool_cases()
         + _batchnorm_cases() + _rescnn_cases() + _extra_activation_cases())


# ----------------------------------------------------------------------------------------------
# ground truth at many points


def _dual(p: float) -> float:
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


def _surface(center: Tensor, eps: float, p: float, n: int, gen: torch.Generator) -> Tensor:
    """Random points on the boundary of the l_p ball (rescaled random points)."""
    d = (oracle.random_points(center, eps, p, n, gen) - center).flatten(1)
    d = d / d.norm(p=p, dim=1, keepdim=True).clamp(min=1e-300) * eps
    return center + d.reshape(n, *center.shape)


def _box_ascent(model: nn.Module, lo: Tensor, hi: Tensor, objectives, gen: torch.Generator,
                steps: int = 25, starts: int = 2) -> Tensor:
    """Projected (sign-)gradient ascent inside a box, as ``oracle.ascent_points`` in a ball."""
    n = len(objectives) * starts
    rows = torch.tensor([o[0] for o in objectives for _ in range(starts)])
    cols = torch.tensor([o[1] if o[1] is not None else -1 for o in objectives
                         for _ in range(starts)])
    signs = torch.tensor([o[2] for o in objectives for _ in range(starts)], dtype=lo.dtype)
    is_norm = cols < 0
    x = oracle.box_points(lo, hi, n, gen)
    step = (hi - lo) / 4
    for _ in range(steps):
        x.requires_grad_(True)
        jac = torch.func.vmap(torch.func.jacrev(lambda z: model(z[None])[0]))(x).flatten(2)
        row = jac[torch.arange(n), rows]
        entry = row.gather(1, cols.clamp(min=0)[:, None])[:, 0] * signs
        value = torch.where(is_norm, row.norm(p=1, dim=1), entry)
        (grad,) = torch.autograd.grad(value.sum(), x, allow_unused=True)
        x = x.detach()
        if grad is None or not torch.isfinite(grad).all():
            break
        x = torch.minimum(torch.maximum(x + step * grad.sign(), lo), hi)
        step = step * 0.85
    return x.detach()


def _points(net: nn.Module, region, b: int, gen: torch.Generator, smooth: bool,
            n_out: int) -> Tensor:
    center = region.center[b]
    d = center.numel()
    objectives = None
    if smooth:
        objectives = [(0, 0, 1.0), (0, d - 1, -1.0), (n_out - 1, d // 2, 1.0),
                      (n_out - 1, d // 3, -1.0), (0, None, 1.0), (n_out - 1, None, 1.0)]
    if region.is_box:
        lo, hi = region.lower[b], region.upper[b]
        parts = [center[None], oracle.box_points(lo, hi, N_RANDOM, gen),
                 oracle.box_vertices(lo, hi, gen, limit=N_VERTICES)]
        if objectives:
            parts.append(_box_ascent(net, lo, hi, objectives, gen))
        return torch.cat(parts)
    eps, p = region.eps, region.norm
    parts = [center[None], oracle.random_points(center, eps, p, N_RANDOM, gen),
             _surface(center, eps, p, N_RANDOM, gen),
             oracle.vertices(center, eps, p, gen, limit=N_VERTICES)]
    if objectives:
        parts.append(oracle.ascent_points(net, center, eps, p, objectives, gen))
    return torch.cat(parts)


def _check(jb, jac: Tensor, label: str) -> list[str]:
    """jac ``[B, N, rows, *in]`` must lie in the bounds; its row dual norms under lipschitz()."""
    jac = jac.flatten(3)
    lo, hi = jb.lower.flatten(2)[:, None], jb.upper.flatten(2)[:, None]
    if lo.shape[-2:] != jac.shape[-2:]:
        return [f"{label}: bounds of shape {tuple(jb.lower.shape)}, Jacobians {tuple(jac.shape)}"]
    if torch.isnan(lo).any() or torch.isnan(hi).any():
        return [f"{label}: NaN in the bounds"]
    problems = []
    scale = TOL * (1 + jac.abs())
    outside = (jac < lo - scale) | (jac > hi + scale)
    if outside.any():
        excess = torch.maximum(lo - jac, jac - hi)
        rel = excess / (1e-300 + jac.abs())
        width = float((hi - lo).flatten(1).median())
        problems.append(
            f"{label}: {int(outside.sum())} Jacobian entries outside the bounds; worst excess "
            f"{float(excess.max()):.3g} (relative {float(rel.max()):.3g}); median width "
            f"{width:.3g}")
    norms = jac.norm(p=_dual(jb.region.norm), dim=-1)  # [B, N, rows]
    lip = jb.lipschitz()[:, None]
    if torch.isnan(lip).any():
        problems.append(f"{label}: NaN Lipschitz bound")
    elif not (norms <= lip * (1 + TOL) + TOL).all():
        excess = float((norms - lip).max())
        problems.append(f"{label}: sampled gradient norm above lipschitz() by {excess:.3g} "
                        f"(norm {float(norms.max()):.6g}, bound {float(lip.min()):.6g})")
    return problems


def _is_clear_refusal(err: Exception) -> bool:
    return isinstance(err, (UnsupportedLayerError, InputError)) and bool(
        _OP_NAME.search(str(err)))


def _region(bounder: JacobianBounder, case: Case, shape, gen: torch.Generator):
    """Centers in [-1, 1] (half the coordinates of the first one near 0, so that kinks of
    activations on the raw input straddle); one or two of them (batching is part of the test)."""
    kind = "vec" if len(shape) == 1 else "img"
    batch = 1 + case.seed % 2
    centers = 2 * torch.rand(batch, *shape, generator=gen, dtype=torch.float64) - 1
    centers[0].view(-1)[::2] *= 0.05
    eps = _EPS[kind][case.region] * 10 ** (0.6 * torch.rand(1, generator=gen).item() - 0.3)
    if case.region == "box":
        half = eps * torch.rand(batch, *shape, generator=gen, dtype=torch.float64) * 2
        half.view(batch, -1)[:, 0] = 0.0  # one degenerate coordinate
        return bounder.region(lower=centers - half, upper=centers + half)
    return bounder.region(centers, eps, case.region)


def _refused(err: Exception, label: str, failures: list[str], refusals: list[str]) -> None:
    """A clear refusal is accepted (collected, and reported as one warning per test); set
    RJ_STRICT_REFUSALS=1 to count refusals as failures.  A refusal that does not name the op is a
    failure."""
    if not _is_clear_refusal(err):
        failures.append(f"{label}: refusal does not name the op: {err}")
    elif os.environ.get("RJ_STRICT_REFUSALS") == "1":
        failures.append(f"{label}: refused (strict mode): {err}")
    else:
        refusals.append(f"{label}: {str(err)[:200]}")


def _report(refusals: list[str], failures: list[str]) -> None:
    if refusals:
        warnings.warn("refused: " + " | ".join(dict.fromkeys(refusals)), stacklevel=2)
    assert not failures, "\n".join(failures)


def _bounder(net: nn.Module, shape, label: str, **kw) -> JacobianBounder | None:
    """A JacobianBounder, None after a clear refusal; a raw exception fails the test."""
    failures: list[str] = []
    refusals: list[str] = []
    try:
        return JacobianBounder(net, input_shape=shape, **kw)
    except (UnsupportedLayerError, InputError) as err:
        _refused(err, label, failures, refusals)
    except Exception as err:  # noqa: BLE001 -- a raw exception from the graph build
        failures.append(f"{label}: building the graph raised a raw {type(err).__name__}: "
                        f"{str(err)[:200]}")
    _report(refusals, failures)
    return None


def _bound_all(net: nn.Module, shape, bounder: JacobianBounder, region, label: str,
               failures: list[str], refusals: list[str], **opts):
    """Yield ``(preact, method, bounds)`` for every pre-activation and bound method that does not
    raise; refusals and raw exceptions are recorded, and the graph is rebuilt after either (a
    failed call must not decide the next one)."""
    for preact in PREACT_METHODS:
        for method in METHODS:
            what = f"{label} preact={preact} method={method}"
            try:
                jb = bounder.bound(region, preact=preact, method=method, **opts)
            except (UnsupportedLayerError, InputError) as err:
                # one line per preact when every method is refused the same way
                _refused(err, f"{label} preact={preact}", failures, refusals)
                bounder = JacobianBounder(net, input_shape=shape, dtype=bounder.dtype)
                continue
            except Exception as err:  # noqa: BLE001 -- any raw exception is a failure
                failures.append(f"{what}: raw {type(err).__name__}: {str(err)[:160]}")
                bounder = JacobianBounder(net, input_shape=shape, dtype=bounder.dtype)
                continue
            yield what, jb


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_family_bounds_contain_true_jacobians(case: Case) -> None:
    torch.manual_seed(case.seed)
    net, shape = case.build()
    net = net.double().eval()
    gen = torch.Generator().manual_seed(case.seed)
    bounder = _bounder(net, shape, case.name)
    if bounder is None:
        return
    region = _region(bounder, case, shape, gen)
    smooth = any(isinstance(m, SMOOTH) for m in net.modules())
    with torch.no_grad():
        n_out = net(region.center).shape[1]
    jac = torch.stack([oracle.jacobians(net, _points(net, region, b, gen, smooth, n_out))
                       for b in range(region.batch)]).detach()
    failures: list[str] = []
    refusals: list[str] = []
    for what, jb in _bound_all(net, shape, bounder, region, case.name, failures, refusals,
                               alpha_iterations=ALPHA_ITERATIONS):
        failures += _check(jb, jac, what)
    _report(refusals, failures)


# ----------------------------------------------------------------------------------------------
# eps = 0: the autograd Jacobian at x0 itself, bitwise, in float32 and float64


def _zero_net(arch: str, act: str) -> tuple[nn.Module, tuple[int, ...]]:
    if arch == "mlp":
        return nn.Sequential(*_mlp(5, 3, act, widths=(8, 6, 5))), (5,)
    if arch == "normalize-mlp":
        return nn.Sequential(Normalize(torch.rand(5) - 0.5, 0.2 + torch.rand(5)),
                             *_mlp(5, 3, act, widths=(8, 6))), (5,)
    shape = (1, 6, 6)
    if arch == "rescnn":
        feats = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), ACTS[act](),
                              Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), ACTS[act](),
                                                     nn.Conv2d(2, 2, 3, padding=1))),
                              ACTS[act]())
        return _with_head(feats, shape), shape
    return _with_head(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), ACTS[act](),
                                    nn.Conv2d(3, 2, 3, stride=2), ACTS[act]()), shape, act), shape


def _autograd_rows(net: nn.Module, x0: Tensor) -> Tensor:
    """The Jacobian by plain reverse-mode autograd, one output row and one point at a time."""
    rows = []
    for x in x0:
        x = x[None].clone().requires_grad_(True)
        out = net(x)[0]
        rows.append(torch.stack([torch.autograd.grad(out[j], x, retain_graph=True)[0][0]
                                 for j in range(out.shape[0])]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("arch", ["mlp", "normalize-mlp", "cnn", "rescnn"])
def test_eps_zero_contains_autograd_jacobian_bitwise(arch: str, act: str,
                                                     dtype: torch.dtype) -> None:
    """At eps = 0 (every norm, and the box lower = upper = x0) the bounds contain the Jacobian
    that autograd computes at x0 (torch.func's jacrev and plain per-row backward), with no
    tolerance at all; lipschitz() is above its dual norms up to 16 ulps of the norm."""
    seed = zlib.crc32(f"{arch}-{act}".encode()) % (2 ** 31)
    torch.manual_seed(seed)
    net, shape = _zero_net(arch, act)
    net = net.to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    x0 = (2 * torch.rand(4, *shape, generator=gen, dtype=torch.float64) - 1).to(dtype)
    jacs = [oracle.jacobians(net, x0).detach(), _autograd_rows(net, x0).detach()]
    label = f"{arch}-{act}-{str(dtype).removeprefix('torch.')}"
    bounder = _bounder(net, shape, label, dtype=dtype)
    if bounder is None:
        return
    regions = {p: bounder.region(x0, 0.0, p) for p in ("1", "2", "inf")}
    regions["box"] = bounder.region(lower=x0, upper=x0)
    failures: list[str] = []
    refusals: list[str] = []
    for rname, region in regions.items():
        for what, jb in _bound_all(net, shape, bounder, region, f"{label} region={rname}",
                                   failures, refusals, alpha_iterations=2):
            lo, hi = jb.lower, jb.upper
            if lo.dtype != dtype:
                failures.append(f"{what}: bounds in {lo.dtype}")
                lo, hi = lo.to(dtype), hi.to(dtype)
            for jac in jacs:
                outside = ~((lo <= jac) & (jac <= hi))
                if outside.any():
                    excess = torch.maximum(lo - jac, jac - hi)[outside]
                    ulp = torch.finfo(dtype).eps * jac[outside].abs().clamp(
                        min=torch.finfo(dtype).tiny)
                    failures.append(f"{what}: {int(outside.sum())} entries outside; worst "
                                    f"excess {float(excess.max()):.3g} "
                                    f"({float((excess / ulp).max()):.2g} ulp)")
                    break
            true_lip = jacs[0].flatten(2).norm(p=_dual(_P[rname]), dim=-1)
            lip = jb.lipschitz().to(dtype)
            slack = 16 * torch.finfo(dtype).eps
            if not (true_lip <= lip * (1 + slack) + slack).all():
                failures.append(f"{what}: dual norm {float(true_lip.max()):.9g} above "
                                f"lipschitz() {float(lip.min()):.9g}")
    _report(refusals, failures)
