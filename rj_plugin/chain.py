"""The graph transformation: auto_LiRPA's computation graph -> the backward Jacobian chain.

A feed-forward graph from the input x to the output f(x) alternates affine nodes and elementwise
activations.  Its Jacobian is (spec section 1)

    df/dx = A_m  diag(sigma_{m-1}'(z_{m-1}))  A_{m-1}  ...  diag(sigma_1'(z_1))  A_1

where each A_k is the *linear part* of a maximal run of affine nodes (a :class:`LinearSegment`;
constant offsets such as biases do not enter the Jacobian) and z_k is the input of the k-th
activation (an :class:`ActivationStep`).  The chain is derived by walking the graph, never from
node names (they differ between auto_LiRPA versions): each node is dispatched on its operator type
through ``LINEAR_OPS`` / ``ACTIVATION_OPS``; an operator in neither table is an
:class:`~rj_plugin.errors.UnsupportedLayerError` naming the node and its op.

Linear steps act on a batch of vectors ``v`` of shape ``[R, *in_shape]`` (``apply``), which is
all that the recursion needs; ``LinearSegment.matrix`` materialises A_k as ``[n_out, n_in]``
(flattened in C order) by applying the segment to identity columns in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rj_plugin.derivatives import Activation, get_activation
from rj_plugin.errors import UnsupportedLayerError
from rj_plugin.lirpa import GraphNode

LinearFn = Callable[[Tensor], Tensor]


@dataclass
class LinearOp:
    """The linear part of one affine graph node: ``apply(v)`` maps ``[R, *in]`` to ``[R, *out]``."""

    node: str
    op: str
    apply: LinearFn


@dataclass
class LinearSegment:
    """A maximal run of affine nodes between activations (or the input / output)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] = ()
    ops: list[LinearOp] = field(default_factory=list)

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    def apply(self, v: Tensor) -> Tensor:
        """The segment's linear map on a batch: ``[R, *in_shape] -> [R, *out_shape]``."""
        for op in self.ops:
            v = op.apply(v)
        return v

    def matrix(self, dtype: torch.dtype, device: torch.device | str,
               max_elements: int = 1 << 24) -> Tensor:
        """A_k as a dense ``[n_out, n_in]`` matrix (inputs and outputs flattened in C order)."""
        cols = max(1, max_elements // max(1, self.n_in + self.n_out))
        blocks = []
        for start in range(0, self.n_in, cols):
            stop = min(self.n_in, start + cols)
            eye = torch.zeros(stop - start, self.n_in, dtype=dtype, device=device)
            eye[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
            out = self.apply(eye.reshape(stop - start, *self.in_shape))
            blocks.append(out.reshape(stop - start, self.n_out))
        return torch.cat(blocks, 0).T.contiguous()


@dataclass
class ActivationStep:
    """An elementwise activation node; its pre-activation bounds are those of ``input_node``."""

    node: str
    op: str
    input_node: str
    activation: Activation
    shape: tuple[int, ...]


@dataclass
class JacobianChain:
    """``segments[0], activations[0], segments[1], ..., activations[m-2], segments[m-1]``."""

    input_node: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    segments: list[LinearSegment]
    activations: list[ActivationStep]

    def describe(self) -> str:
        """One line per step, e.g. for error messages and logs."""
        lines = []
        for k, seg in enumerate(self.segments):
            ops = ", ".join(f"{op.op}[{op.node}]" for op in seg.ops) or "identity"
            lines.append(f"A_{k + 1}: {seg.in_shape} -> {seg.out_shape} ({ops})")
            if k < len(self.activations):
                act = self.activations[k]
                lines.append(f"sigma_{k + 1}: {act.activation.name} [{act.node}] on {act.shape}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Operator tables.  A builder gets the node, the index of its one variable input and the values
# of its constant inputs (None at the variable's position), and returns the linear map.

LinearBuilder = Callable[[GraphNode, int, list], LinearFn]


def _reshape_to_output(node: GraphNode, var: int, consts: list) -> LinearFn:
    out = node.output_shape[1:]
    return lambda v: v.reshape(v.shape[0], *out)


def _linear(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0 or node.attrs.get("transA", 0):
        raise UnsupportedLayerError(f"node {node.name} ({node.op}): only a constant weight "
                                    "applied to the variable input is supported")
    weight = consts[1]
    # auto_LiRPA's Linear/Gemm: y = alpha * x @ w.T if transB else alpha * x @ w (+ beta * b).
    mat = weight.T if node.attrs.get("transB", 0) else weight
    alpha = float(node.attrs.get("alpha", 1.0))
    if alpha != 1.0:
        mat = alpha * mat
    return lambda v: v @ mat


def _matmul(node: GraphNode, var: int, consts: list) -> LinearFn:
    other = consts[1 - var]
    if var == 0:
        return lambda v: v @ other
    return lambda v: other @ v


def _add(node: GraphNode, var: int, consts: list) -> LinearFn:
    out = node.output_shape[1:]
    return lambda v: v.expand(v.shape[0], *out) if tuple(v.shape[1:]) != tuple(out) else v


def _sub(node: GraphNode, var: int, consts: list) -> LinearFn:
    keep = _add(node, var, consts)
    if var == 0:
        return keep
    return lambda v: -keep(v)


def _neg(node: GraphNode, var: int, consts: list) -> LinearFn:
    return lambda v: -v


def _mul(node: GraphNode, var: int, consts: list) -> LinearFn:
    factor = consts[1 - var]
    return lambda v: v * factor


def _div(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0:
        raise UnsupportedLayerError(f"node {node.name} (Div): a constant divided by the input "
                                    "is not affine")
    divisor = consts[1]
    return lambda v: v / divisor


def _transpose(node: GraphNode, var: int, consts: list) -> LinearFn:
    perm = list(node.attrs["perm"])
    if perm[0] != 0:
        raise UnsupportedLayerError(f"node {node.name} (Transpose): permutes the batch axis")
    return lambda v: v.permute(*perm)


def _conv(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0:
        raise UnsupportedLayerError(f"node {node.name} (Conv): variable weights not supported")
    weight, a = consts[1], node.attrs
    stride, padding = a.get("stride", 1), a.get("padding", 0)
    dilation, groups = a.get("dilation", 1), a.get("groups", 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return lambda v: conv(v, weight, None, stride, padding, dilation, groups)


def _batchnorm(node: GraphNode, var: int, consts: list) -> LinearFn:
    if node.attrs.get("training", False):
        raise UnsupportedLayerError(f"node {node.name} (BatchNormalization) is in training mode;"
                                    " call model.eval() first")
    weight, _, _, var_, = consts[1], consts[2], consts[3], consts[4]
    eps = float(node.attrs.get("epsilon", 1e-5))
    scale = weight / torch.sqrt(var_ + eps)
    shape = (1, -1) + (1,) * (len(node.output_shape) - 2)
    return lambda v: v * scale.reshape(shape)


def _avgpool(node: GraphNode, var: int, consts: list) -> LinearFn:
    a = node.attrs
    kernel, stride, padding = a["kernel_shape"], a.get("stride", a["kernel_shape"]), a["padding"]
    if len(kernel) != 2:
        raise UnsupportedLayerError(f"node {node.name} (AveragePool): only 2-d pooling")
    return lambda v: F.avg_pool2d(v, kernel, stride, padding, ceil_mode=a.get("ceil_mode", False),
                                  count_include_pad=a.get("count_include_pad", True))


LINEAR_OPS: dict[str, LinearBuilder] = {
    "Linear": _linear,
    "MatMul": _matmul,
    "Add": _add,
    "Sub": _sub,
    "Neg": _neg,
    "Mul": _mul,
    "Div": _div,
    "Flatten": _reshape_to_output,
    "Reshape": _reshape_to_output,
    "Squeeze": _reshape_to_output,
    "Unsqueeze": _reshape_to_output,
    "Identity": _reshape_to_output,
    "Dropout": _reshape_to_output,  # an eval-mode dropout is the identity
    "Transpose": _transpose,
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "AveragePool": _avgpool,
}


def _activation_name(node: GraphNode) -> str:
    table = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Atan": "arctan",
             "Softplus": "softplus"}
    if node.op == "LeakyRelu":
        return f"leaky_relu:{float(node.attrs['alpha'])}"
    if node.op == "Elu":
        return f"elu:{float(node.attrs.get('alpha', 1.0))}"
    return table[node.op]


ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "Tanh", "Sigmoid", "Atan", "Softplus", "Elu"})

# Elementwise but with a derivative that changes sign, or not elementwise: refused explicitly.
_REFUSED = {
    "MaxPool": "max-pooling is a data-dependent selection, not an elementwise activation",
    "Gelu": "GELU has a derivative that can be negative",
    "Softmax": "softmax is not elementwise",
}


def build_chain(nodes: list[GraphNode], input_node: str, output_node: str) -> JacobianChain:
    """Walk a topologically ordered graph from ``input_node`` to ``output_node``.

    Raises:
        UnsupportedLayerError: for a node whose operator is not affine-with-constant-operands or a
            supported elementwise activation, or for a graph that is not a chain (a node with two
            variable inputs, as in residual connections).
    """
    by_name = {n.name: n for n in nodes}
    variable = {input_node}
    start = by_name[input_node]
    segment = LinearSegment(in_shape=tuple(start.output_shape[1:]))
    segments: list[LinearSegment] = []
    activations: list[ActivationStep] = []
    last = input_node
    for node in nodes:
        var_inputs = [i for i, name in enumerate(node.inputs) if name in variable]
        if node.name == input_node or not var_inputs:
            continue
        if len(var_inputs) > 1:
            raise UnsupportedLayerError(
                f"node {node.name} ({node.op}) combines several branches of the input; residual "
                "and multi-branch graphs are not supported by the chain transformation yet")
        var = var_inputs[0]
        if node.inputs[var] != last:
            raise UnsupportedLayerError(
                f"node {node.name} ({node.op}) branches off {node.inputs[var]}, whose output is "
                "also used elsewhere; only chain-structured graphs are supported yet")
        variable.add(node.name)
        last = node.name
        if node.op in ACTIVATION_OPS:
            segment.out_shape = tuple(by_name[node.inputs[var]].output_shape[1:])
            segments.append(segment)
            activations.append(ActivationStep(node.name, node.op, node.inputs[var],
                                              get_activation(_activation_name(node)),
                                              tuple(node.output_shape[1:])))
            segment = LinearSegment(in_shape=tuple(node.output_shape[1:]))
        elif node.op in LINEAR_OPS:
            consts = [by_name[name].value if i != var else None
                      for i, name in enumerate(node.inputs)]
            missing = [node.inputs[i] for i, c in enumerate(consts) if i != var and c is None]
            if missing:
                raise UnsupportedLayerError(f"node {node.name} ({node.op}): input(s) {missing} "
                                            "are neither the input's descendants nor constants")
            segment.ops.append(LinearOp(node.name, node.op, LINEAR_OPS[node.op](node, var, consts)))
        else:
            reason = _REFUSED.get(node.op, "no Jacobian rule for this operator")
            raise UnsupportedLayerError(f"unsupported node {node.name} (op {node.op}): {reason}")
    if last != output_node:
        raise UnsupportedLayerError(f"the output node {output_node} does not lie on the chain "
                                    f"from the input (the chain ends at {last})")
    segment.out_shape = tuple(by_name[output_node].output_shape[1:])
    segments.append(segment)
    return JacobianChain(input_node, segments[0].in_shape, segment.out_shape, segments,
                         activations)
