"""The run-configuration schema of ``rj run``: the one place where every key is defined.

A configuration is a YAML mapping of sections (the alpha-beta-CROWN convention), each a mapping
of keys.  :func:`load_config` reads the file, applies ``--set section.key=value`` overrides,
rejects unknown sections and keys, wrong types and impossible values with a
:class:`~rj_plugin.errors.ConfigError` that names the key and the file, fills in every default,
and checks the combinations of keys.  The result, :class:`RunConfig`, records every option
actually used (it is written into each results file).

Sections (``configs/README.md`` is the user-facing copy of this table; a test keeps the two in
step):

* ``general``: device, dtype, seed, results_dir, progress, plots.
* ``model``: ``name`` (a built-in demo model) or ``path`` (.onnx / .pt), ``input_shape``, and
  normalisation ``mean`` / ``std`` applied as a first layer ``(x - mean) / std``.
* ``data``: ``source`` = digits | npz | vnnlib | random, ``path``, ``split``, and the selection
  ``start`` / ``end`` or ``indices``.
* ``specification``: the input region (``region`` = ball | box, ``norm``, ``eps``, ``domain``)
  and the output specification (``output`` = all | margins | matrix, ``target``, ``matrix``).
* ``bounds``: auto_LiRPA's pre-activation bound method and alpha-CROWN settings.
* ``jacobian``: the Jacobian bound algorithm (recurjac | linear | fastlip | interval) and its
  options.
* ``task``: ``name`` and the per-task options of :data:`TASK_OPTIONS`.

Relative paths (``model.path``, ``data.path``, ``specification.matrix``) are looked up in the
current directory, then in the folder that holds the configuration file, then in its parent (so
``configs/*.yaml`` that say ``../shared/...`` work from the repository root and from elsewhere).
``general.results_dir`` is relative to the current directory.

YAML 1.1 reads ``1e-5`` (no dot) as a string; numeric strings are accepted for float keys.
"""

from __future__ import annotations

import copy
import glob
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rj_plugin.errors import ConfigError

__all__ = [
    "SCHEMA",
    "TASK_OPTIONS",
    "TASKS",
    "Key",
    "RunConfig",
    "load_config",
    "parse_device",
    "parse_override",
    "validate_config",
]


class _Invalid(Exception):
    """A value does not satisfy a key's check (the message says what was expected)."""


Check = Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """One configuration key.

    Attributes:
        check: normalises a raw YAML value or raises ``_Invalid``.
        default: the value when the key is absent (already normalised); ``REQUIRED`` if none.
        kind: the type, in words (for messages and the README).
        doc: what the key means.
    """

    check: Check
    default: Any
    kind: str
    doc: str


REQUIRED = object()


# -- value checks -----------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Invalid(f"expected an integer, got {_describe(v)}")
        if lo is not None and v < lo:
            raise _Invalid(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise _Invalid(f"must be <= {hi}, got {v}")
        return int(v)
    return check


def _float(lo: float | None = None, *, positive: bool = False, finite: bool = True) -> Check:
    def check(v: Any) -> float:
        if isinstance(v, bool):
            raise _Invalid(f"expected a number, got {_describe(v)}")
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise _Invalid(f"expected a number, got {_describe(v)}") from None
        if not isinstance(v, int | float):
            raise _Invalid(f"expected a number, got {_describe(v)}")
        v = float(v)
        if math.isnan(v) or (finite and math.isinf(v)):
            raise _Invalid(f"must be a finite number, got {v}")
        if positive and v <= 0:
            raise _Invalid(f"must be > 0, got {v}")
        if lo is not None and v < lo:
            raise _Invalid(f"must be >= {lo}, got {v}")
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"expected true or false, got {_describe(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Invalid(f"expected a non-empty string, got {_describe(v)}")
    return v


def parse_device(text: str) -> Any:
    """The ``torch.device`` named by ``text`` (cpu, cuda, cuda:1, ...), checked to exist here.

    Raises ``ValueError`` saying what is wrong: a name torch does not parse, CUDA (or another
    accelerator) requested where it is not available, a CUDA index beyond the devices present,
    or the data-less ``meta`` device.  Shared by ``general.device`` and ``rj jacobian --device``.
    """
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r} requested but CUDA is not available on this machine "
                             "(use cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{text!r}: there is no CUDA device {dev.index} (this machine has "
                             f"{count})")
        return dev
    if dev.type == "meta":
        raise ValueError(f"{text!r}: the meta device holds no data; use cpu or cuda")
    try:
        torch.empty(1, device=dev)
    except Exception:  # noqa: BLE001 - any failure means the backend cannot hold tensors here
        raise ValueError(f"{text!r}: device type {dev.type} is not available on this machine "
                         "(use cpu or cuda)") from None
    return dev


def _device(v: Any) -> str:
    """A device name that :func:`parse_device` accepts (kept as written)."""
    name = _str(v)
    try:
        parse_device(name)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return name


def _choice(*options: str) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            raise _Invalid(f"expected one of {', '.join(options)}; got {_describe(v)}")
        return v
    return check


def _optional(inner: Check) -> Check:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)
    return check


def _list(inner: Check, min_len: int = 1, unique: bool = False) -> Check:
    def check(v: Any) -> list:
        if not isinstance(v, list):
            raise _Invalid(f"expected a list, got {_describe(v)}")
        if len(v) < min_len:
            raise _Invalid(f"expected at least {min_len} item(s), got {len(v)}")
        out = []
        for i, item in enumerate(v):
            try:
                out.append(inner(item))
            except _Invalid as exc:
                raise _Invalid(f"item {i}: {exc}") from None
        if unique and len(set(map(repr, out))) != len(out):
            raise _Invalid(f"items must be distinct, got {out}")
        return out
    return check


def _number_or_list(inner: Check) -> Check:
    """A number, or a non-empty list of numbers."""
    list_check = _list(inner)

    def check(v: Any) -> float | list[float]:
        return list_check(v) if isinstance(v, list) else inner(v)
    return check


def _norm(v: Any) -> str:
    """1, 2 or inf (numbers or strings; YAML's ``.inf`` too) -> ``"1"``, ``"2"``, ``"inf"``."""
    if isinstance(v, bool):
        raise _Invalid(f"expected 1, 2 or inf, got {_describe(v)}")
    if isinstance(v, int | float):
        if math.isinf(v) and v > 0:
            return "inf"
        if v in (1, 2):
            return str(int(v))
    if isinstance(v, str) and v.lower().removeprefix("l") in ("1", "2", "inf"):
        return v.lower().removeprefix("l")
    raise _Invalid(f"expected 1, 2 or inf, got {_describe(v)}")


def _domain(v: Any) -> list[float]:
    pair = _list(_float(), min_len=2)(v)
    if len(pair) != 2 or not pair[0] < pair[1]:
        raise _Invalid(f"expected [low, high] with low < high, got {v!r}")
    return pair


# -- the schema -------------------------------------------------------------------------------

PREACT = ("ibp", "crown", "crown-ibp", "alpha-crown")
JACOBIAN_METHODS = ("recurjac", "linear", "fastlip", "interval")
TASKS = ("jacobian", "lipschitz", "global-lipschitz", "robustness", "stationary",
         "monotonicity")
#: Robustness certificates: the Lipschitz integral over the ``jacobian`` section's bounds, or
#: auto_LiRPA's own margin lower bounds with one of its methods.
ROBUSTNESS_METHODS = ("integral", *PREACT)

SCHEMA: dict[str, dict[str, Key]] = {
    "general": {
        "device": Key(_device, "cpu", "string",
                      "torch device (cpu, cuda, cuda:1, ...); must exist on this machine"),
        "dtype": Key(_choice("float64", "float32"), "float64", "float64 | float32",
                     "precision of every computation"),
        "seed": Key(_int(0), 0, "int >= 0", "seed of random points, PGD and sampling"),
        "results_dir": Key(_optional(_str), None, "path | null",
                           "results folder (null: results/<config file name>)"),
        "progress": Key(_bool, True, "bool", "tqdm progress bar over the inputs (on a terminal)"),
        "plots": Key(_bool, True, "bool", "write PNG plots"),
    },
    "model": {
        "name": Key(_optional(_str), None, "string | null",
                    "a built-in demo model: digits-relu, digits-tanh"),
        "path": Key(_optional(_str), None, "path | null", "an .onnx or .pt/.pth file"),
        "input_shape": Key(_optional(_list(_int(1))), None, "list of int | null",
                           "shape of one input (needed when the model does not record it)"),
        "mean": Key(_optional(_number_or_list(_float())), None, "number | list | null",
                    "normalisation (x - mean) / std as a first layer: a number, one value per "
                    "channel (input_shape[0]) or one per input element"),
        "std": Key(_optional(_number_or_list(_float(positive=True))), None,
                   "number > 0 | list | null", "see mean (null: 1)"),
    },
    "data": {
        "source": Key(_choice("digits", "npz", "vnnlib", "random"), "digits",
                      "digits | npz | vnnlib | random",
                      "bundled digits set, an .npy/.npz file, VNN-LIB file(s), random points"),
        "path": Key(_optional(_str), None, "path | glob | null",
                    "npz: an .npz (arrays x, y) or .npy (points only); vnnlib: a file or a glob"),
        "split": Key(_choice("train", "test", "all"), "test", "train | test | all",
                     "digits split"),
        "x_key": Key(_str, "x", "string", "npz: name of the points array [N, *input_shape]"),
        "y_key": Key(_str, "y", "string", "npz: name of the labels array [N] (optional)"),
        "num_points": Key(_int(1), 10, "int >= 1", "random: how many points"),
        "low": Key(_float(), 0.0, "number", "random: uniform lower end"),
        "high": Key(_float(), 1.0, "number", "random: uniform upper end (> low)"),
        "start": Key(_int(0), 0, "int >= 0", "first index used"),
        "end": Key(_optional(_int(1)), None, "int | null", "one past the last index (null: all)"),
        "indices": Key(_optional(_list(_int(0), unique=True)), None, "list of int | null",
                       "explicit indices (instead of start/end)"),
    },
    "specification": {
        "region": Key(_choice("ball", "box"), "ball", "ball | box",
                      "ball: ||x - x0||_p <= eps; box: [x0 - eps, x0 + eps] clipped to domain, "
                      "or the VNN-LIB input box"),
        "norm": Key(_norm, "inf", "1 | 2 | inf", "the ball's norm p (a box is l_inf)"),
        "eps": Key(_float(0.0), 0.01, "number >= 0", "radius (and the start of radius searches)"),
        "domain": Key(_optional(_domain), None, "[low, high] | null",
                      "box regions are clipped to this input domain"),
        "output": Key(_choice("auto", "all", "margins", "matrix"), "auto",
                      "auto | all | margins | matrix",
                      "rows bounded: the outputs, margins f_label - f_j, or C f (auto: margins "
                      "for robustness, all otherwise)"),
        "target": Key(_optional(_int(0)), None, "int | null",
                      "margins: only f_label - f_target (null: against all others)"),
        "matrix": Key(_optional(_str), None, "path | null", "output matrix: C as .npy [k, n_out]"),
    },
    "bounds": {
        "method": Key(_choice(*PREACT), "crown", " | ".join(PREACT),
                      "auto_LiRPA pre-activation bounds that RecurJac consumes"),
        "alpha_iterations": Key(_int(1), 20, "int >= 1", "alpha-CROWN iterations"),
        "alpha_lr": Key(_float(positive=True), 0.1, "number > 0", "alpha-CROWN learning rate"),
    },
    "jacobian": {
        "method": Key(_choice(*JACOBIAN_METHODS), "recurjac", " | ".join(JACOBIAN_METHODS),
                      "Jacobian bound algorithm"),
        "intersect": Key(_bool, True, "bool",
                         "intersect RecurJac with the Fast-Lip interval bounds"),
        "max_elements": Key(_optional(_int(1)), None, "int | null",
                            "RecurJac working-set size (null: the library default)"),
    },
    "task": {
        "name": Key(_choice(*TASKS), REQUIRED, " | ".join(TASKS), "which task to run"),
    },
}

_STEPS = Key(_int(1), 15, "int >= 1", "radius-search evaluations (spec 5a)")
_TOL = Key(_float(positive=True), 1e-5, "number > 0", "radius search stops when hi - lo <= this")
_START = Key(_optional(_float(positive=True)), None, "number > 0 | null",
             "first radius tried (null: specification.eps)")

#: Per-task options, in the ``task`` section next to ``name``.
TASK_OPTIONS: dict[str, dict[str, Key]] = {
    "jacobian": {
        "output_index": Key(_int(0), 0, "int >= 0", "row whose bound widths are plotted"),
        "save_bounds": Key(_bool, True, "bool", "write the element-wise bounds into the JSON"),
        "plot_inputs": Key(_int(0), 4, "int >= 0", "heat maps for the first n inputs"),
    },
    "lipschitz": {
        "margins": Key(_bool, True, "bool",
                       "also bound the margins f_label - f_j when the output is not margins"),
        "curve": Key(_bool, True, "bool", "the curve of the bound over eps values"),
        "eps_list": Key(_optional(_list(_float(0.0))), None, "list of number | null",
                        "curve radii (null: logspace(log_start, log_end, log_steps))"),
        "log_start": Key(_float(), -4.0, "number", "log10 of the smallest curve radius"),
        "log_end": Key(_float(), 0.0, "number", "log10 of the largest curve radius"),
        "log_steps": Key(_int(2), 9, "int >= 2", "number of log-spaced radii"),
        "global_reference": Key(_bool, True, "bool",
                                "global (unbounded) bound and operator-norm product lines"),
        "plot_rows": Key(_optional(_list(_int(0), unique=True)), None, "list of int | null",
                         "rows drawn (null: the label's row, or row 0)"),
        "plot_inputs": Key(_int(0), 2, "int >= 0", "curve plots for the first n inputs"),
        "refine_seconds": Key(_optional(_float(positive=True)), None, "number | null",
                              "refine the region's bound by branch and bound (local_lipschitz) "
                              "for this many seconds per input: reports upper, lower, gap"),
        "refine_gap": Key(_float(0.0), 1e-3, "number >= 0",
                          "relative gap at which the refinement stops"),
    },
    "global-lipschitz": {
        "methods": Key(_optional(_list(_choice(*JACOBIAN_METHODS), unique=True)), None,
                       "list | null", "Jacobian algorithms compared (null: jacobian.method)"),
    },
    "robustness": {
        "methods": Key(_list(_choice(*ROBUSTNESS_METHODS), unique=True), ["integral", "crown"],
                       "list of " + " | ".join(ROBUSTNESS_METHODS),
                       "integral: RecurJac Lipschitz integral (jacobian + bounds sections); "
                       "others: auto_LiRPA margin lower bound >= 0"),
        "lipsteps": Key(_int(1), 15, "int >= 1", "S, the integral's number of shells"),
        "steps": _STEPS,
        "tolerance": _TOL,
        "start_eps": _START,
        "max_radius": Key(_float(positive=True), 1e5, "number > 0", "largest radius tried"),
        "pgd": Key(_bool, True, "bool", "PGD upper reference (smallest adversarial radius)"),
        "pgd_steps": Key(_int(1), 50, "int >= 1", "PGD iterations per attack"),
        "pgd_restarts": Key(_int(1), 5, "int >= 1", "PGD random restarts per attack"),
        "pgd_search_steps": Key(_int(1), 12, "int >= 1", "attacks in the PGD radius search"),
    },
    "stationary": {
        "output_index": Key(_optional(_int(0)), None, "int | null",
                            "row checked (null: the label's row for output all, else 0)"),
        "steps": _STEPS,
        "tolerance": _TOL,
        "start_eps": _START,
        "max_radius": Key(_optional(_float(positive=True)), None, "number > 0 | null",
                          "cap (null: 100 for l1, 10 for l2, 1 for l_inf)"),
        "scan_points": Key(_int(0), 10, "int >= 0", "radii scanned in [0, R_max]"),
    },
    "monotonicity": {
        "features": Key(_optional(_list(_int(0), unique=True)), None, "list of int | null",
                        "input features (flat indices; null: all)"),
        "outputs": Key(_optional(_list(_int(0), unique=True)), None, "list of int | null",
                       "rows of the output specification (null: all)"),
        "direction": Key(_choice("increasing", "decreasing", "both"), "both",
                         "increasing | decreasing | both", "claims checked per pair"),
        "samples": Key(_int(0), 256, "int >= 0", "random points searched for counter-points"),
        "ascent_steps": Key(_int(0), 20, "int >= 0",
                            "gradient steps per undecided claim (smooth activations)"),
        "max_ascent_claims": Key(_int(0), 256, "int >= 0", "cap on claims given an ascent"),
    },
}

_PATH_KEYS = (("model", "path"), ("specification", "matrix"))
_DEFAULT_MAX_RADIUS = {"1": 100.0, "2": 10.0, "inf": 1.0}


# -- the validated configuration --------------------------------------------------------------


@dataclass
class RunConfig:
    """A validated configuration with every default filled in.

    Attributes:
        sections: ``{section: {key: value}}``; ``sections["task"]`` holds ``name`` and that
            task's options.
        source: the configuration file (or ``"<dict>"``).
        overrides: the ``--set`` strings applied, in order.
        paths: resolved absolute paths of the path keys (``"model.path"``, ``"data.path"`` as a
            list for globs, ``"specification.matrix"``).
    """

    sections: dict[str, dict[str, Any]]
    source: str = "<dict>"
    overrides: list[str] = field(default_factory=list)
    paths: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    @property
    def task(self) -> str:
        return self.sections["task"]["name"]

    def error(self, key: str, msg: str) -> ConfigError:
        """A ConfigError naming ``key`` and this configuration's file."""
        return ConfigError(f"{self.source}: {key}: {msg}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A deep copy of the sections (JSON/YAML friendly)."""
        return copy.deepcopy(self.sections)


class _DuplicateKey(yaml.YAMLError):
    """A mapping repeats a key: ``name`` (dotted, e.g. ``general.seed``), the 1-based ``line``
    of the repetition and the ``first`` line that gave it."""

    def __init__(self, name: str, first: int, line: int) -> None:
        super().__init__(f"{name}: given twice, at line {first} and again at line {line}")
        self.name, self.first, self.line = name, first, line


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, path: str,
                       seen_nodes: set[int]) -> None:
    """Raise :class:`_DuplicateKey` for the first mapping under ``node`` that repeats a key.

    Keys brought in by a ``<<`` merge may be overridden, as YAML allows; aliases are walked
    once."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            child = path
            if key_node.tag != "tag:yaml.org,2002:merge":
                key = (loader.construct_object(key_node, deep=True)
                       if isinstance(key_node, yaml.ScalarNode) else None)
                line = key_node.start_mark.line + 1
                child = f"{path}.{key}" if path else str(key)
                if key is not None:
                    if key in seen:
                        raise _DuplicateKey(child, seen[key], line)
                    seen[key] = line
            _check_unique_keys(loader, value_node, child, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, f"{path}[{i}]", seen_nodes)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also rejects a repeated key in any mapping (two ``task:``
    sections, or a key given twice in one section), which ``safe_load`` would resolve silently
    by keeping the last one."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(loader, node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> ``(section, key, value)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    name, raw = text.split("=", 1)
    parts = name.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key, got {name.strip()!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except _DuplicateKey as exc:
        raise ConfigError(f"--set {text!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot read the value as YAML: "
                          f"{' '.join(str(exc).split())}") from None
    return parts[0], parts[1], value


def _resolve_path(raw: str, key: str, base_dirs: list[Path], where: str,
                  allow_glob: bool = False) -> Path | list[Path]:
    """Find a path (or, with ``allow_glob``, the sorted matches of a glob) in ``base_dirs``."""
    tried = []
    candidates = [Path(raw)] if Path(raw).is_absolute() else [d / raw for d in base_dirs]
    for cand in candidates:
        tried.append(str(cand))
        if allow_glob and any(c in raw for c in "*?["):
            matches = [Path(m) for m in glob.glob(str(cand))]
            if matches:
                return sorted((m.resolve() for m in matches), key=_natural_key)
        elif cand.exists():
            return cand.resolve()
    raise ConfigError(f"{where}: {key}: {raw!r} not found (looked at {', '.join(tried)})")


def _natural_key(path: Path) -> list:
    """Sort key that orders ``prop_2`` before ``prop_10``."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _section(raw: dict, name: str, schema: dict[str, Key], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given = raw.get(name) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: {name}: expected a mapping of keys, got {_describe(given)}")
    for key in given:
        if key not in schema:
            raise ConfigError(f"{where}: {name}.{key}: unknown key; {name} takes "
                              f"{', '.join(schema)}")
    for key, spec in schema.items():
        if key in given:
            try:
                out[key] = spec.check(given[key])
            except _Invalid as exc:
                raise ConfigError(f"{where}: {name}.{key}: {exc}") from None
        elif spec.default is REQUIRED:
            raise ConfigError(f"{where}: {name}.{key}: missing (required)")
        else:
            out[key] = copy.deepcopy(spec.default)
    return out


def validate_config(raw: Any, source: str = "<dict>", overrides: list[str] | None = None,
                    base_dirs: list[Path] | None = None) -> RunConfig:
    """Check a configuration mapping (after overrides) and fill in defaults.

    Args:
        raw: the YAML document: ``{section: {key: value}}``.
        source: the file it came from (named in every error).
        overrides: ``--set`` strings, already applied to ``raw``; only recorded here.
        base_dirs: where relative paths are looked up (default: the current directory).
    """
    where = source
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {_describe(raw)}")
    for name in raw:
        if name not in SCHEMA:
            raise ConfigError(f"{where}: {name}: unknown section; expected "
                              f"{', '.join(SCHEMA)}")
    if "task" not in raw:
        raise ConfigError(f"{where}: task: missing section (task.name is required)")
    sections: dict[str, dict[str, Any]] = {}
    for name, schema in SCHEMA.items():
        if name == "task":
            task_raw = raw.get("task")
            if not isinstance(task_raw, dict):
                raise ConfigError(f"{where}: task: expected a mapping of keys, got "
                                  f"{_describe(task_raw)}")
            if "name" not in task_raw:
                raise ConfigError(f"{where}: task.name: missing (required); one of "
                                  f"{', '.join(TASKS)}")
            try:
                task_name = schema["name"].check(task_raw["name"])
            except _Invalid as exc:
                raise ConfigError(f"{where}: task.name: {exc}") from None
            task_schema = {**schema, **TASK_OPTIONS[task_name]}
            sections["task"] = _section(raw, "task", task_schema, where)
        else:
            sections[name] = _section(raw, name, schema, where)
    cfg = RunConfig(sections, source, list(overrides or []))
    _check_combinations(cfg, base_dirs or [Path.cwd()])
    return cfg


def _check_combinations(cfg: RunConfig, base_dirs: list[Path]) -> None:
    """Cross-key rules; resolves paths into ``cfg.paths``."""
    model, data, spec, task = cfg["model"], cfg["data"], cfg["specification"], cfg["task"]
    err = cfg.error
    if (model["name"] is None) == (model["path"] is None):
        raise err("model.name", "give exactly one of model.name (demo model) and model.path")
    if model["name"] is not None:
        from rj_plugin.models import DEMO_MODELS

        if model["name"] not in DEMO_MODELS:
            raise err("model.name", f"unknown demo model {model['name']!r}; known: "
                                    f"{', '.join(DEMO_MODELS)}")
    for section, key in _PATH_KEYS:
        if cfg[section][key] is not None:
            cfg.paths[f"{section}.{key}"] = _resolve_path(cfg[section][key], f"{section}.{key}",
                                                          base_dirs, cfg.source)
    if model["path"] is not None:
        suffix = Path(model["path"]).suffix.lower()
        if suffix not in (".onnx", ".pt", ".pth"):
            raise err("model.path", f"unknown model file extension {suffix!r} "
                                    "(use .onnx, .pt or .pth)")
    # data
    source = data["source"]
    if source in ("npz", "vnnlib"):
        if data["path"] is None:
            raise err("data.path", f"data.source {source} needs a path")
        resolved = _resolve_path(data["path"], "data.path", base_dirs, cfg.source,
                                 allow_glob=source == "vnnlib")
        files = resolved if isinstance(resolved, list) else [resolved]
        want = (".vnnlib",) if source == "vnnlib" else (".npz", ".npy")
        for f in files:
            if f.suffix.lower() not in want:
                raise err("data.path", f"{f.name}: expected a {' or '.join(want)} file for "
                                       f"data.source {source}")
        cfg.paths["data.path"] = [str(f) for f in files]
    elif data["path"] is not None:
        raise err("data.path", f"data.source {source} takes no path")
    if source == "random" and not data["low"] < data["high"]:
        raise err("data.high", f"must be > data.low ({data['low']}), got {data['high']}")
    if data["indices"] is not None and (data["start"] != 0 or data["end"] is not None):
        raise err("data.indices", "give either indices or start/end, not both")
    if data["end"] is not None and data["end"] <= data["start"]:
        raise err("data.end", f"must be > data.start ({data['start']}), got {data['end']}")
    # specification
    name = task["name"]
    if spec["output"] == "auto":
        spec["output"] = "margins" if name == "robustness" else "all"
    if spec["output"] == "matrix":
        if spec["matrix"] is None:
            raise err("specification.matrix", "specification.output matrix needs a matrix file")
        if Path(spec["matrix"]).suffix.lower() != ".npy":
            raise err("specification.matrix", "expected an .npy file")
    elif spec["matrix"] is not None:
        raise err("specification.matrix", f"only used with output matrix, not "
                                          f"{spec['output']}")
    if spec["target"] is not None and spec["output"] != "margins":
        raise err("specification.target", "only used with output margins")
    if spec["region"] == "box" and spec["norm"] != "inf":
        raise err("specification.norm", "a box region is an l_inf region; use norm inf")
    if spec["domain"] is not None and spec["region"] != "box":
        raise err("specification.domain", "only used with region box")
    if source == "vnnlib" and spec["region"] == "box" and spec["domain"] is not None:
        raise err("specification.domain", "VNN-LIB boxes are used as given (no domain)")
    # tasks
    if name in ("robustness", "stationary"):
        if spec["region"] != "ball":
            raise err("specification.region", f"task {name} searches a radius: use region ball")
        start = task["start_eps"] if task["start_eps"] is not None else spec["eps"]
        if start <= 0:
            raise err("task.start_eps", "the radius search needs a start > 0 (set task.start_eps"
                                        " or specification.eps > 0)")
        task["start_eps"] = start
    if name == "robustness" and spec["output"] == "all":
        raise err("specification.output", "robustness certifies margins (or C f >= 0 with a "
                                          "matrix); use margins or matrix")
    if name == "stationary" and task["max_radius"] is None:
        task["max_radius"] = _DEFAULT_MAX_RADIUS[spec["norm"]]
    if name == "global-lipschitz" and task["methods"] is None:
        task["methods"] = [cfg["jacobian"]["method"]]
    if name == "lipschitz" and not task["log_start"] <= task["log_end"]:
        raise err("task.log_end", f"must be >= task.log_start ({task['log_start']})")


def _apply_overrides(raw: dict, overrides: list[str], schema: dict | None = None) -> dict:
    """A copy of ``raw`` with the ``--set section.key=value`` overrides applied (sections must be
    those of ``schema``, the ``rj run`` schema by default)."""
    schema = SCHEMA if schema is None else schema
    raw = copy.deepcopy(raw)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in schema:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}; expected "
                              f"{', '.join(schema)}")
        current = raw.setdefault(section, {})
        if current is None:
            current = raw[section] = {}
        if not isinstance(current, dict):
            raise ConfigError(f"--set {text!r}: section {section} is not a mapping in the file")
        current[key] = value
    return raw


def _read_yaml_file(path: str | Path) -> Any:
    """The YAML document of a configuration file, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: configuration file not found" if not p.exists()
                          else f"{path}: not a file (expected a YAML configuration)")
    try:
        return _load_yaml(p.read_text(encoding="utf-8"))
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}; each section and each key may appear only "
                          "once") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict | None = None) -> RunConfig:
    """Read and validate a configuration file (or an in-memory mapping ``raw``).

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied on top (values read as YAML).
        raw: a mapping used instead of a file (``path`` may still name it for messages and
            relative paths).
    """
    overrides = list(overrides or [])
    source = str(path) if path is not None else "<dict>"
    base_dirs = [Path.cwd()]
    if raw is None:
        if path is None:
            raise ConfigError("no configuration file given")
        raw = _read_yaml_file(path)
    if path is not None:
        folder = Path(path).resolve().parent
        base_dirs += [folder, folder.parent]
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {_describe(raw)}")
    raw = _apply_overrides(raw or {}, overrides)
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"
    return validate_config(raw, source, overrides, base_dirs)


def schema_rows() -> list[tuple[str, str, str, Any, str]]:
    """``(section, key, kind, default, doc)`` for every key (task options as ``task[name]``)."""
    rows = []
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            default = "required" if spec.default is REQUIRED else spec.default
            rows.append((section, key, spec.kind, default, spec.doc))
    for task, keys in TASK_OPTIONS.items():
        for key, spec in keys.items():
            rows.append((f"task[{task}]", key, spec.kind, spec.default, spec.doc))
    return rows


# -- the verifier's per-benchmark configuration (rj verify / rj vnncomp) ----------------------
#
# A separate schema: ``configs/vnncomp/<benchmark>.yaml`` sets how every instance of a benchmark
# is verified; the instance itself (model, property, timeout) always comes from instances.csv or
# the command line, so keys that would name one (model.path, specification.vnnlib, ...) are
# rejected with a message saying so.

#: auto_LiRPA methods the verifier runs on the whole box (VerifyOptions.lirpa_methods).
LIRPA_METHODS = ("ibp", "crown", "alpha-crown")

VNNCOMP_SCHEMA: dict[str, dict[str, Key]] = {
    "general": {
        "device": Key(_device, "cpu", "string",
                      "torch device (cpu, cuda, cuda:1, ...); must exist on this machine"),
        "seed": Key(_int(0), 0, "int >= 0", "seed of the random points and PGD restarts"),
        "torch_threads": Key(_int(1), 1, "int >= 1", "torch threads of one instance's process"),
        "results_dir": Key(_optional(_str), None, "path | null",
                           "rj vnncomp: output folder when --output is not given"),
        "progress": Key(_bool, True, "bool", "rj vnncomp: tqdm progress bar over the instances"),
    },
    "model": {},
    "specification": {
        "check_witness": Key(_bool, True, "bool",
                             "re-check a sat witness with onnxruntime (tolerance 0) before "
                             "answering sat; a failed re-check answers unknown"),
    },
    "attack": {
        "enabled": Key(_bool, True, "bool", "search for a counterexample before bounding"),
        "random_points": Key(_int(0), 10000, "int >= 0",
                             "uniform random points (and as many random vertices) per box"),
        "pgd_steps": Key(_int(0), 100, "int >= 0", "PGD iterations per restart"),
        "pgd_restarts": Key(_int(0), 64, "int >= 0", "PGD restarts (the first from the centre)"),
    },
    "solver": {
        "lirpa_methods": Key(_list(_choice(*LIRPA_METHODS), unique=True),
                             ["crown", "alpha-crown"], "list of " + " | ".join(LIRPA_METHODS),
                             "auto_LiRPA bound methods run in order on what the previous "
                             "ones left"),
        "alpha_iterations": Key(_int(1), 20, "int >= 1", "alpha-CROWN iterations"),
        "jacobian": Key(_bool, True, "bool",
                        "use RecurJac Jacobian bounds (Lipschitz / monotonicity arguments)"),
    },
    "bab": {
        "enabled": Key(_bool, True, "bool", "branch and bound on input splits after the "
                                            "whole-box bounds"),
        "batch": Key(_int(1), 256, "int >= 1", "sub-boxes per auto_LiRPA call"),
        "max_inputs": Key(_int(0), 32, "int >= 0",
                          "above this many free inputs, no input splitting (unknown after "
                          "the whole-box stages)"),
    },
}

#: Keys that would describe one instance, with the reason given when a benchmark config sets one.
_PER_INSTANCE_KEYS: dict[str, dict[str, str]] = {
    "model": {k: "the model of each instance comes from instances.csv (or rj verify --model)"
              for k in ("path", "onnx", "name", "input_shape", "file")},
    "specification": {k: "the property of each instance comes from instances.csv (or rj verify "
                         "--vnnlib)" for k in ("vnnlib", "path", "property", "file", "region",
                                               "eps", "norm", "target", "matrix", "domain")},
    "general": {"timeout": "the timeout of each instance comes from instances.csv (or rj verify "
                           "--timeout); scale it with rj vnncomp --timeout-scale"},
}

#: How the schema's keys map onto the fields of ``rj_plugin.verify.pipeline.VerifyOptions``.
VERIFY_OPTION_KEYS: dict[str, tuple[str, str]] = {
    "falsify": ("attack", "enabled"),
    "random_points": ("attack", "random_points"),
    "pgd_steps": ("attack", "pgd_steps"),
    "pgd_restarts": ("attack", "pgd_restarts"),
    "lirpa_methods": ("solver", "lirpa_methods"),
    "alpha_iterations": ("solver", "alpha_iterations"),
    "jacobian": ("solver", "jacobian"),
    "bab": ("bab", "enabled"),
    "bab_batch": ("bab", "batch"),
    "bab_max_inputs": ("bab", "max_inputs"),
    "seed": ("general", "seed"),
    "device": ("general", "device"),
    "torch_threads": ("general", "torch_threads"),
}


@dataclass
class VerifyConfig:
    """A validated per-benchmark verifier configuration with every default filled in.

    Attributes:
        sections: ``{section: {key: value}}`` for every section of :data:`VNNCOMP_SCHEMA`.
        source: the configuration file (or ``"<defaults>"`` / ``"<dict>"``).
        overrides: the ``--set`` strings applied, in order.
    """

    sections: dict[str, dict[str, Any]]
    source: str = "<defaults>"
    overrides: list[str] = field(default_factory=list)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def verify_options(self) -> dict[str, Any]:
        """The keyword arguments of ``VerifyOptions`` (lists become tuples)."""
        out: dict[str, Any] = {}
        for name, (section, key) in VERIFY_OPTION_KEYS.items():
            value = self.sections[section][key]
            out[name] = tuple(value) if isinstance(value, list) else value
        return out

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A deep copy of the sections (JSON/YAML friendly)."""
        return copy.deepcopy(self.sections)


def validate_vnncomp_config(raw: Any, source: str = "<dict>",
                            overrides: list[str] | None = None) -> VerifyConfig:
    """Check a per-benchmark verifier configuration mapping and fill in defaults.

    Unknown sections and keys, keys that would describe one instance (``model.path``,
    ``specification.vnnlib``, ``general.timeout``, ...), wrong types and impossible values are a
    :class:`ConfigError` naming the file and the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {_describe(raw)}")
    for name in raw:
        if name not in VNNCOMP_SCHEMA:
            raise ConfigError(f"{source}: {name}: unknown section; a verifier configuration has "
                              f"{', '.join(VNNCOMP_SCHEMA)}")
    sections: dict[str, dict[str, Any]] = {}
    for name, schema in VNNCOMP_SCHEMA.items():
        given = raw.get(name) or {}
        if isinstance(given, dict):
            for key in given:
                why = _PER_INSTANCE_KEYS.get(name, {}).get(key)
                if why is not None and key not in schema:
                    raise ConfigError(f"{source}: {name}.{key}: a per-instance key, not allowed "
                                      f"in a benchmark configuration: {why}")
            if not schema and given:
                key = next(iter(given))
                raise ConfigError(f"{source}: {name}.{key}: unknown key; section {name} has no "
                                  "settable keys in a verifier configuration")
        sections[name] = _section(raw, name, schema, source)
    return VerifyConfig(sections, source, list(overrides or []))


def load_vnncomp_config(path: str | Path | None = None, overrides: list[str] | None = None,
                        raw: dict | None = None) -> VerifyConfig:
    """Read and validate a per-benchmark verifier configuration (``configs/vnncomp/*.yaml``).

    Args:
        path: the YAML file; None (and no ``raw``) gives the defaults.
        overrides: ``section.key=value`` strings applied on top (values read as YAML).
        raw: a mapping used instead of a file.
    """
    overrides = list(overrides or [])
    source = str(path) if path is not None else ("<dict>" if raw is not None else "<defaults>")
    if raw is None and path is not None:
        raw = _read_yaml_file(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {_describe(raw)}")
    raw = _apply_overrides(raw or {}, overrides, VNNCOMP_SCHEMA)
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"
    return validate_vnncomp_config(raw, source, overrides)


def vnncomp_schema_rows() -> list[tuple[str, str, str, Any, str]]:
    """``(section, key, kind, default, doc)`` for every key of :data:`VNNCOMP_SCHEMA`."""
    return [(section, key, spec.kind, spec.default, spec.doc)
            for section, keys in VNNCOMP_SCHEMA.items() for key, spec in keys.items()]
