"""Parser for the VNN-LIB subset used by the VNN-COMP benchmarks, and for counterexample files.

Supported: ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``; ``(assert F)`` where ``F``
is ``(<= a b)``, ``(>= a b)`` (``<``/``>`` are read as non-strict, as VNN-COMP does), ``(and F...)``
or ``(or F...)``, and ``a``, ``b`` are variables or numbers (also ``(- c)``).  Input atoms compare
one ``X_i`` with a number; output atoms compare a ``Y_j`` with a number or with another ``Y_k``.
The asserts are conjoined.  The input set must come out as a union of boxes and the unsafe output
set as a union of polyhedra ``C y <= d``, with the two independent of each other (a disjunct
that mixes X and Y atoms is accepted when it is the only one, or when all its siblings share the
same X part or the same Y part).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from rj_plugin.errors import InputError

__all__ = ["VnnlibSpec", "parse_vnnlib", "read_counterexample", "read_vnnlib"]

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"^([XY])_(\d+)$")
_CMP = {"<=": "<=", "<": "<=", ">=": ">=", ">": ">="}


@dataclass
class VnnlibSpec:
    """A parsed VNN-LIB property.

    ``input_boxes``: list of ``(lower [n_inputs], upper [n_inputs])`` float64 arrays; the input set
    is their union (``X_i`` indexes the network input flattened in C order).
    ``output_constraints``: list of disjuncts ``(C [k, n_outputs], d [k])``; the UNSAFE set is the
    union over disjuncts of ``{y : C y <= d}`` (all k rows).  ``k`` may be 0 (no output
    constraint: every output is unsafe).
    """

    n_inputs: int
    n_outputs: int
    input_boxes: list[tuple[np.ndarray, np.ndarray]]
    output_constraints: list[tuple[np.ndarray, np.ndarray]]
    source: str = field(default="<string>")

    def input_index(self, x: np.ndarray, tol: float = 0.0) -> int | None:
        """Index of the first box containing ``x`` (``[n_inputs]``, any shape flattened in C
        order) up to ``tol``, or None."""
        xf = np.asarray(x, dtype=np.float64).reshape(-1)
        for i, (lo, hi) in enumerate(self.input_boxes):
            if np.all(xf >= lo - tol) and np.all(xf <= hi + tol):
                return i
        return None

    def unsafe_index(self, y: np.ndarray, tol: float = 0.0) -> int | None:
        """Index of the first disjunct with ``C y <= d + tol`` for ``y: [n_outputs]``, or None."""
        yf = np.asarray(y, dtype=np.float64).reshape(-1)
        for i, (c, d) in enumerate(self.output_constraints):
            if np.all(c @ yf <= d + tol):
                return i
        return None


# --------------------------------------------------------------------------------------------
# s-expressions


@dataclass
class _Sexp:
    """A parenthesised list with the line it starts on."""

    items: list[_Sexp | _Atom]
    line: int


@dataclass
class _Atom:
    """A bare token with its line."""

    text: str
    line: int


def _tokens(text: str) -> list[tuple[str, int]]:
    """Split ``text`` into ``(token, line)`` pairs, dropping ``;`` comments."""
    out: list[tuple[str, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0]
        out.extend((m.group(0), lineno) for m in _TOKEN.finditer(line))
    return out


def _parse_sexps(text: str, source: str) -> list[_Sexp]:
    """Parse all top-level s-expressions of ``text``."""
    stack: list[_Sexp] = []
    top: list[_Sexp] = []
    last_line = 1
    for tok, line in _tokens(text):
        last_line = line
        if tok == "(":
            stack.append(_Sexp([], line))
        elif tok == ")":
            if not stack:
                raise InputError(f"{source}:{line}: unbalanced ')'")
            done = stack.pop()
            (stack[-1].items if stack else top).append(done)  # type: ignore[arg-type]
        else:
            if not stack:
                raise InputError(f"{source}:{line}: token {tok!r} outside parentheses")
            stack[-1].items.append(_Atom(tok, line))
    if stack:
        raise InputError(
            f"{source}:{stack[-1].line}: '(' is never closed (file ends at {last_line})"
        )
    return top


# --------------------------------------------------------------------------------------------
# formulas -> disjunctive normal form over atoms
#
# An atom is ("X", i, op, value) for X_i op value, or ("Y", row, rhs) for row . y <= rhs.

_XAtom = tuple[str, int, str, float]
_YAtom = tuple[str, tuple[tuple[int, float], ...], float]
_Atomic = _XAtom | _YAtom
_Term = tuple[_Atomic, ...]


class _Builder:
    """Turns parsed asserts into boxes and output polyhedra for one file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.x_decl: dict[int, int] = {}  # index -> line of declaration
        self.y_decl: dict[int, int] = {}

    def err(self, line: int, msg: str) -> InputError:
        """An ``InputError`` naming the file and line."""
        return InputError(f"{self.source}:{line}: {msg}")

    def declare(self, node: _Sexp) -> None:
        """Handle ``(declare-const NAME Real)``."""
        items = node.items
        if len(items) != 3 or not all(isinstance(i, _Atom) for i in items):
            raise self.err(node.line, "expected (declare-const NAME Real)")
        name, kind = items[1].text, items[2].text  # type: ignore[union-attr]
        m = _VAR.match(name)
        if m is None:
            raise self.err(node.line, f"variable {name!r} is neither X_i nor Y_j")
        if kind != "Real":
            raise self.err(node.line, f"variable {name} has unsupported type {kind!r}")
        table = self.x_decl if m.group(1) == "X" else self.y_decl
        idx = int(m.group(2))
        if idx in table:
            raise self.err(node.line, f"variable {name} declared twice")
        table[idx] = node.line

    def operand(self, node: _Sexp | _Atom) -> tuple[str, int] | float:
        """A variable ``("X"|"Y", index)`` or a number."""
        if isinstance(node, _Sexp):
            items = node.items
            if len(items) == 2 and isinstance(items[0], _Atom) and items[0].text == "-":
                inner = self.operand(items[1])
                if isinstance(inner, float):
                    return -inner
            raise self.err(node.line, "unsupported term (only variables and numbers)")
        m = _VAR.match(node.text)
        if m is not None:
            kind, idx = m.group(1), int(m.group(2))
            table = self.x_decl if kind == "X" else self.y_decl
            if idx not in table:
                raise self.err(node.line, f"variable {node.text} is not declared")
            return kind, idx
        try:
            value = float(node.text)
        except ValueError:
            raise self.err(node.line, f"unknown symbol {node.text!r}") from None
        if not np.isfinite(value):
            raise self.err(node.line, f"non-finite constant {node.text!r}")
        return value

    def atom(self, node: _Sexp, op: str) -> _Atomic:
        """One comparison, normalised."""
        if len(node.items) != 3:
            raise self.err(node.line, f"({op} ...) needs exactly two operands")
        a, b = self.operand(node.items[1]), self.operand(node.items[2])
        if op == ">=":  # a >= b  <=>  b <= a
            a, b = b, a
        # now a <= b
        if isinstance(a, tuple) and isinstance(b, tuple):
            if a[0] == "Y" and b[0] == "Y":
                if a[1] == b[1]:
                    return ("Y", (), 0.0)  # Y_i <= Y_i always holds
                return ("Y", ((a[1], 1.0), (b[1], -1.0)), 0.0)
            raise self.err(node.line, "comparison of two variables is supported for Y only")
        if isinstance(a, tuple):
            if a[0] == "X":
                return ("X", a[1], "<=", float(b))  # type: ignore[arg-type]
            return ("Y", ((a[1], 1.0),), float(b))  # type: ignore[arg-type]
        if isinstance(b, tuple):
            if b[0] == "X":
                return ("X", b[1], ">=", float(a))
            return ("Y", ((b[1], -1.0),), -float(a))
        raise self.err(node.line, "comparison of two constants")

    def dnf(self, node: _Sexp | _Atom) -> list[_Term]:
        """Disjunctive normal form of a formula: a list of conjunctions of atoms."""
        if not isinstance(node, _Sexp) or not node.items or not isinstance(node.items[0], _Atom):
            raise self.err(node.line, "expected a formula (<= ...), (>= ...), (and ...), (or ...)")
        head = node.items[0].text
        if head in _CMP:
            return [(self.atom(node, _CMP[head]),)]
        if head in ("and", "or"):
            if len(node.items) < 2:
                raise self.err(node.line, f"empty ({head})")
            parts = [self.dnf(child) for child in node.items[1:]]
            if head == "or":
                return [term for part in parts for term in part]
            if _count_product(parts) > 100_000:
                raise self.err(node.line, "formula too large once expanded to disjunctive form")
            return [tuple(a for t in combo for a in t) for combo in product(*parts)]
        raise self.err(node.line, f"unsupported operator {head!r}")


def _count_product(parts: list[list[_Term]]) -> int:
    """Number of terms of the DNF product of ``parts``."""
    n = 1
    for p in parts:
        n *= len(p)
    return n


def _split_term(term: _Term) -> tuple[_Term, _Term]:
    """``(X atoms, Y atoms)`` of a conjunction."""
    xs = tuple(a for a in term if a[0] == "X")
    ys = tuple(a for a in term if a[0] == "Y")
    return xs, ys


def _product(a: list[_Term], b: list[_Term]) -> list[_Term]:
    """Conjunction of two DNFs."""
    return [ta + tb for ta, tb in product(a, b)]


def parse_vnnlib(text: str, source: str = "<string>") -> VnnlibSpec:
    """Parse VNN-LIB ``text``; ``source`` names the file in error messages.

    Raises ``InputError`` (``source:line: problem``) on unknown syntax, undeclared or unbounded
    input variables, or an empty input set.
    """
    b = _Builder(source)
    # the spec is (AND x_common) AND (OR x_dnf), and the same for Y
    x_common: list[_Atomic] = []
    y_common: list[_Atomic] = []
    x_dnf: list[_Term] = [()]
    y_dnf: list[_Term] = [()]
    assert_line = 0
    for node in _parse_sexps(text, source):
        head = node.items[0] if node.items else None
        if not isinstance(head, _Atom):
            raise b.err(node.line, "expected (declare-const ...) or (assert ...)")
        if head.text == "declare-const":
            b.declare(node)
            continue
        if head.text != "assert":
            raise b.err(node.line, f"unsupported command {head.text!r}")
        if len(node.items) != 2:
            raise b.err(node.line, "(assert ...) takes exactly one formula")
        assert_line = node.line
        terms = b.dnf(node.items[1])
        splits = [_split_term(t) for t in terms]
        x_parts = list(dict.fromkeys(s[0] for s in splits))
        y_parts = list(dict.fromkeys(s[1] for s in splits))
        # (X and Y) parts separate only if the disjuncts are the full product of the two
        if set(splits) != set(product(x_parts, y_parts)):
            raise b.err(node.line, "input and output constraints are coupled inside (or ...)")
        for common, dnf, parts in ((x_common, x_dnf, x_parts), (y_common, y_dnf, y_parts)):
            if len(parts) == 1:  # a plain conjunction: no need to expand anything
                common.extend(parts[0])
                continue
            if len(dnf) * len(parts) > 100_000:
                raise b.err(node.line, "too many disjuncts once expanded")
            dnf[:] = _product(dnf, parts)

    for kind, table in (("X", b.x_decl), ("Y", b.y_decl)):
        missing = sorted(set(range(len(table))) - set(table))
        if missing:
            last = max(table)
            raise b.err(table[last], f"{kind}_{missing[0]} is not declared but {kind}_{last} is")
    n_in, n_out = len(b.x_decl), len(b.y_decl)
    if n_in == 0:
        raise b.err(1, "no input variable X_i is declared")
    if n_out == 0:
        raise b.err(1, "no output variable Y_j is declared")

    boxes: list[tuple[np.ndarray, np.ndarray]] = []
    for term in x_dnf:
        lo = np.full(n_in, -np.inf)
        hi = np.full(n_in, np.inf)
        for _, i, op, v in (*x_common, *term):  # type: ignore[misc]
            if op == "<=":
                hi[i] = min(hi[i], v)
            else:
                lo[i] = max(lo[i], v)
        unbounded = np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))
        if unbounded.size:
            i = int(unbounded[0])
            raise b.err(b.x_decl[i], f"input variable X_{i} is unbounded (needs <= and >= bounds)")
        if np.all(lo <= hi):  # an empty box contributes nothing to the union
            boxes.append((lo, hi))
    if not boxes:
        raise b.err(assert_line, "the input set is empty (lower > upper in every box)")

    constraints: list[tuple[np.ndarray, np.ndarray]] = []
    for term in y_dnf:
        rows = [a for a in (*y_common, *term) if a[1]]  # drop trivially true Y_i <= Y_i
        c = np.zeros((len(rows), n_out))
        d = np.zeros(len(rows))
        for r, (_, coeffs, rhs) in enumerate(rows):  # type: ignore[misc]
            for j, w in coeffs:
                c[r, j] += w
            d[r] = rhs
        constraints.append((c, d))
    return VnnlibSpec(n_in, n_out, boxes, constraints, source)


def read_vnnlib(path: str | Path) -> VnnlibSpec:
    """Parse the VNN-LIB file at ``path`` (see :func:`parse_vnnlib`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError(f"{p}: cannot read VNN-LIB file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not a text file ({exc.reason})") from exc
    return parse_vnnlib(text, source=str(p))


def read_counterexample(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a VNN-COMP ``((X_0 v) ... (Y_0 v) ...)`` witness; return ``(x [n_in], y [n_out])``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError(f"{p}: cannot read counterexample: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not a text file ({exc.reason})") from exc
    top = _parse_sexps(text, str(p))
    if len(top) != 1:
        raise InputError(f"{p}:1: expected one parenthesised list of (VAR value) pairs")
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for item in top[0].items:
        pair = item.items if isinstance(item, _Sexp) else []
        name, num = (pair[0], pair[1]) if len(pair) == 2 else (None, None)
        m = _VAR.match(name.text) if isinstance(name, _Atom) else None
        if m is None or not isinstance(num, _Atom):
            raise InputError(f"{p}:{item.line}: expected (X_i value) or (Y_j value)")
        try:
            v = float(num.text)
        except ValueError:
            raise InputError(f"{p}:{item.line}: bad number {num.text!r}") from None
        values[m.group(1)][int(m.group(2))] = v
    arrays = []
    for kind in ("X", "Y"):
        table = values[kind]
        if sorted(table) != list(range(len(table))) or not table:
            raise InputError(f"{p}:1: the {kind}_i indices are not 0..n-1")
        arrays.append(np.array([table[i] for i in range(len(table))], dtype=np.float64))
    return arrays[0], arrays[1]
