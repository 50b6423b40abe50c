r"""The verification pipeline for one VNN-COMP instance: ``verify_instance``.

Question: does some x in the vnnlib input set (a union of boxes) have ``f(x)`` in the unsafe set
(a union of polyhedra ``C y <= d``)?  ``sat``: yes, with a witness re-checked on onnxruntime;
``unsat``: no, proven by sound bounds over the whole input set; ``unknown``: neither, and the
enabled stages are exhausted; ``timeout``: the deadline came first; ``error``: the instance
could not be processed (reason in ``details["error"]``).

Stages (each switchable in :class:`VerifyOptions`):

1. falsify (``falsify-random``, ``falsify-pgd``): centre, random points and random vertices
   of every box, then PGD on ``v(x) = max_i (C f(x) - d)_i`` per disjunct;
2. ``lirpa``: CROWN, then alpha-CROWN on what CROWN left, per disjunct and input box;
3. ``jacobian``: RecurJac's mean-value bound with the monotone collapse;
4. ``bab``: input-space branch and bound over batches of sub-boxes (stages 2-3 on each batch,
   attacks on the unproven ones, sensitivity splits), only when the free inputs number at most
   ``bab_max_inputs``.

``unsat`` is only ever returned when every (disjunct, input box) pair was proven by stage 2, 3
or 4; every failure of any kind becomes ``error`` (or ``timeout``), never ``unsat``.

The deadline: the pipeline runs in a worker thread that polls the deadline between stages and
between batches; ``verify_instance`` itself returns ``timeout`` at the deadline even if the
worker is inside a long call (model loading, one auto_LiRPA call), and the worker then stops at
its next poll.
"""

from __future__ import annotations

import atexit
import math
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rj_plugin.errors import RJError
from rj_plugin.io.vnnlib import VnnlibSpec, read_vnnlib
from rj_plugin.lirpa import PREACT_METHODS
from rj_plugin.verify import falsify
from rj_plugin.verify.bab import Disjunct, branch_and_bound
from rj_plugin.verify.network import Network, load_network
from rj_plugin.verify.prove import SpecBounder, collapse, proven_rows
from rj_plugin.verify.witness import recheck

ANSWERS = ("sat", "unsat", "unknown", "timeout", "error")
_LIRPA_ALLOWED = ("ibp", "crown", "alpha-crown")


@dataclass
class VerifyOptions:
    """Options of :func:`verify_instance` (JSON-friendly; defaults suit ACAS Xu-sized nets).

    Attributes:
        falsify: stage 1 (and the attacks on unproven sub-boxes in stage 4).
        random_points: uniform points and as many random vertices per input box.
        pgd_steps, pgd_restarts: PGD per disjunct and box (the first start is the centre).
        lirpa_methods: stage 2's methods, a subset of ``ibp``, ``crown``, ``alpha-crown``, run
            in that order on what the previous ones left (empty: stage 2 off).
        alpha_iterations: alpha-CROWN's optimisation steps.
        jacobian: stage 3 (mean-value bound, monotone collapse, sensitivity branching).
        bab: stage 4.
        bab_batch: sub-boxes per auto_LiRPA call.
        bab_max_inputs: above this many free inputs, no input splitting (``unknown`` after
            stages 1-3).
        seed: random seed of the search.
        device: torch device.
        torch_threads: ``torch.set_num_threads`` for the call (process-wide; 0 leaves it
            alone).  1 is fastest for ACAS Xu-sized nets: their matmuls are too small for
            intra-op threads, which slow batched bounds down many times on a busy machine.
    """

    falsify: bool = True
    random_points: int = 10000
    pgd_steps: int = 100
    pgd_restarts: int = 64
    lirpa_methods: tuple[str, ...] = ("crown", "alpha-crown")
    alpha_iterations: int = 20
    jacobian: bool = True
    bab: bool = True
    bab_batch: int = 256
    bab_max_inputs: int = 32
    seed: int = 0
    device: str = "cpu"
    torch_threads: int = 1

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        for name in ("random_points", "pgd_steps", "pgd_restarts", "bab_max_inputs",
                     "torch_threads"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("alpha_iterations", "bab_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [m for m in self.lirpa_methods if m not in _LIRPA_ALLOWED]
        if bad:
            raise ValueError(f"unknown lirpa method(s) {bad}; choose from "
                             f"{', '.join(_LIRPA_ALLOWED)}")


@dataclass
class Verdict:
    """The answer for one instance.

    Attributes:
        answer: ``sat`` | ``unsat`` | ``unknown`` | ``timeout`` | ``error``.
        witness: for sat, ``(x, y)``: x flat in C order and y flat, float64, exactly as
            re-checked with onnxruntime on the original ONNX file (x in an input box and y in
            an unsafe disjunct, both at tolerance 0).
        stage: the stage that decided (``falsify-random``, ``falsify-pgd``, ``lirpa``,
            ``jacobian``, ``bab``, ``bab-attack``, ``load``, ``deadline``, ...).
        seconds: wall-clock time of the call.
        details: JSON-serialisable: ``times`` per stage, bound summaries, inputs collapsed,
            sub-boxes explored, why stages were skipped, ``error`` text.
    """

    answer: str
    witness: tuple[np.ndarray, np.ndarray] | None
    stage: str
    seconds: float
    details: dict = field(default_factory=dict)


class _Timeout(Exception):
    """The deadline passed (raised at a poll inside the worker)."""


#: The worker stops this long before the deadline, so that the verdict is returned in time.
_SAFETY_S = 0.1
#: One worker at a time: a worker abandoned at its deadline finishes its current step (it
#: polls the cancelled clock) before the next instance starts (they share torch's global state,
#: e.g. the default dtype that auto_LiRPA's patched calls switch).
_WORKER_LOCK = threading.Lock()
_LIVE: list[tuple[threading.Thread, _Clock]] = []


class _Clock:
    """The deadline, polled by the worker; ``cancelled`` makes every later poll fail."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cancelled = False

    def expired(self, reserve: float = 0.0) -> bool:
        """True when cancelled, or when a step expected to last ``reserve`` seconds would end
        within ``_SAFETY_S`` of the deadline."""
        return self.cancelled or time.monotonic() + reserve >= self.deadline - _SAFETY_S

    def check(self, reserve: float = 0.0) -> None:
        if self.expired(reserve):
            raise _Timeout


@atexit.register
def _stop_workers() -> None:
    """Let abandoned workers reach their next poll before the interpreter exits (torch aborts
    the process when a daemon thread is killed inside an operator)."""
    for thread, clock in list(_LIVE):
        clock.cancelled = True
        thread.join(30.0)


def _num(x: float) -> float | None:
    """A JSON-safe float (None for NaN / inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _nums(t: torch.Tensor) -> list:
    return [[_num(v) for v in row] for row in t.reshape(t.shape[0], -1).tolist()]


def verify_instance(onnx_path: str | Path, vnnlib_path: str | Path, timeout_s: float,
                    options: VerifyOptions | None = None, *,
                    deadline: float | None = None) -> Verdict:
    """Verify one instance (see the module docstring).

    Args:
        onnx_path, vnnlib_path: the competition files.
        timeout_s: the budget in seconds (used when ``deadline`` is None).
        options: stage switches and sizes (defaults: :class:`VerifyOptions`).
        deadline: a ``time.monotonic()`` value by which to return; model loading included.

    Returns:
        a :class:`Verdict`; never raises for a bad instance (``error`` with the reason).
    """
    start = time.monotonic()
    if deadline is None:
        deadline = start + float(timeout_s)
    clock = _Clock(deadline)
    box: dict[str, Verdict] = {}

    def work() -> None:
        if not _WORKER_LOCK.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return
        try:
            if not clock.expired():
                box["verdict"] = _guarded(onnx_path, vnnlib_path, options or VerifyOptions(),
                                          clock, start)
        finally:
            _WORKER_LOCK.release()
            _LIVE[:] = [w for w in _LIVE if w[1] is not clock]

    worker = threading.Thread(target=work, name="rj-verify", daemon=True)
    _LIVE.append((worker, clock))
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic() - 0.01))
    if "verdict" in box:
        return box["verdict"]
    clock.cancelled = True
    worker.join(0.005)
    if "verdict" in box:
        return box["verdict"]
    return Verdict("timeout", None, "deadline", time.monotonic() - start,
                   {"reason": "the deadline passed inside a step that cannot be interrupted "
                              "(model loading, one bound call) or while a previous instance's "
                              "worker was finishing; that worker stops at its next poll"})


def _guarded(onnx_path, vnnlib_path, options: VerifyOptions, clock: _Clock, start: float
             ) -> Verdict:
    details: dict = {"times": {}, "options": _options_dict(options)}
    state = {"stage": "setup"}
    try:
        answer, witness, stage = _run(Path(onnx_path), Path(vnnlib_path), options, clock,
                                      details, state)
    except _Timeout:
        answer, witness, stage = "timeout", None, state["stage"]
    except (RJError, ValueError, OSError) as exc:
        details["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        answer, witness, stage = "error", None, state["stage"]
    except Exception as exc:  # an internal failure: reported, never turned into an answer
        details["error"] = f"internal error in stage {state['stage']}: {type(exc).__name__}: " \
                           f"{' '.join(str(exc).split())[:500]}"
        details["traceback"] = traceback.format_exc(limit=8)
        answer, witness, stage = "error", None, state["stage"]
    return Verdict(answer, witness, stage, time.monotonic() - start, details)


def _options_dict(options: VerifyOptions) -> dict:
    out = asdict(options)
    out["lirpa_methods"] = list(options.lirpa_methods)
    return out


class _Stage:
    """Times a stage into ``details["times"]`` and records it as the current one."""

    def __init__(self, name: str, details: dict, state: dict, clock: _Clock) -> None:
        self.name, self.details, self.state, self.clock = name, details, state, clock

    def __enter__(self) -> _Stage:
        self.clock.check()
        self.state["stage"] = self.name
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        times = self.details["times"]
        times[self.name] = round(times.get(self.name, 0.0) + time.perf_counter() - self.t0, 4)


def _run(onnx_path: Path, vnnlib_path: Path, options: VerifyOptions, clock: _Clock,
         details: dict, state: dict) -> tuple[str, tuple | None, str]:
    options.check()
    if int(options.torch_threads) > 0:
        torch.set_num_threads(int(options.torch_threads))
    torch_gen = torch.Generator().manual_seed(int(options.seed))
    dev = torch.device(options.device)
    with _Stage("load", details, state, clock):
        if not onnx_path.is_file():
            raise RJError(f"ONNX file not found: {onnx_path}")
        if not vnnlib_path.is_file():
            raise RJError(f"VNN-LIB file not found: {vnnlib_path}")
        spec = read_vnnlib(vnnlib_path)
        net = load_network(onnx_path, options.device, probe=spec.input_boxes[0])
        if spec.n_inputs != net.n_inputs or spec.n_outputs != net.n_outputs:
            raise RJError(f"the VNN-LIB file declares {spec.n_inputs} inputs and "
                          f"{spec.n_outputs} outputs; the network has {net.n_inputs} inputs "
                          f"and {net.n_outputs} outputs")
        details["network"] = {"inputs": net.n_inputs, "outputs": net.n_outputs,
                              "input_shape": list(net.input_shape),
                              "batch_rewrite": net.rewritten,
                              "torch_vs_onnxruntime": net.max_gap,
                              "boxes": len(spec.input_boxes),
                              "disjuncts": len(spec.output_constraints)}
    lower = torch.as_tensor(np.stack([b[0] for b in spec.input_boxes]), device=dev)
    upper = torch.as_tensor(np.stack([b[1] for b in spec.input_boxes]), device=dev)
    rows = [(torch.as_tensor(c, device=dev), torch.as_tensor(d, device=dev))
            for c, d in spec.output_constraints]

    # An empty disjunct (no output constraint) makes every input unsafe.
    if any(c.shape[0] == 0 for c, _ in rows):
        with _Stage("falsify-random", details, state, clock):
            found = recheck(net.checker, spec, ((lower + upper) / 2).cpu().numpy())
        if found is not None:
            return "sat", found, "falsify-random"

    if options.falsify:
        found, stage = _falsify(net, spec, lower, upper, rows, options, clock, details, state,
                                torch_gen)
        if found is not None:
            return "sat", found, stage

    with _Stage("build", details, state, clock):
        bounder = SpecBounder(net, options.jacobian, options.device)
        if bounder.jacobian_skipped:
            details["jacobian_skipped"] = bounder.jacobian_skipped
        details["network"]["bound_batch"] = min(bounder.max_batch, 1 << 20)

    # open[(disjunct, box)] = True while not proven; lb[i]: [boxes, k_i]
    open_ = torch.ones(len(rows), lower.shape[0], dtype=torch.bool, device=dev)
    lbs = [torch.full((lower.shape[0], c.shape[0]), -torch.inf, dtype=torch.float64,
                      device=dev) for c, _ in rows]
    methods = [m for m in _LIRPA_ALLOWED if m in options.lirpa_methods]
    summary: dict = {}
    crown_s = 0.0
    for method in methods:
        with _Stage("lirpa", details, state, clock):
            # The rows of every open disjunct go into one call (one specification C, as
            # auto_LiRPA takes it), on the boxes that are open for any of them: one CROWN pass
            # and one alpha-CROWN optimisation instead of one per disjunct (9 on an MNIST
            # robustness property).  Each disjunct then keeps its own rows' bounds.
            active = [i for i in range(len(rows)) if bool(open_[i].any())]
            if not any(rows[i][0].shape[0] for i in active):  # nothing open has rows to bound
                continue
            clock.check()
            # alpha-CROWN costs about 3 CROWN passes per iteration: skip it (the other stages
            # still run) when it would not end before the deadline
            if method == "alpha-crown" and clock.expired(
                    3.0 * (options.alpha_iterations + 1) * crown_s):
                details["alpha_crown_skipped"] = "not enough time left before the deadline"
                continue
            boxes = torch.nonzero(open_[active].any(dim=0)).flatten()
            t0 = time.perf_counter()
            lb_all = bounder.lirpa(lower[boxes], upper[boxes],
                                   torch.cat([rows[i][0] for i in active]),
                                   torch.cat([rows[i][1] for i in active]), method,
                                   options.alpha_iterations)
            if method != "alpha-crown":
                crown_s = max(crown_s, time.perf_counter() - t0)
            start = 0
            for i in active:
                c, d = rows[i]
                lb = lb_all[:, start:start + c.shape[0]]
                start += c.shape[0]
                lbs[i][boxes] = torch.maximum(lbs[i][boxes], lb)
                open_[i, boxes] = open_[i, boxes] & ~proven_rows(lbs[i][boxes], d).any(dim=1)
                summary.setdefault(method, {})[str(i)] = _nums(lb)
    if methods:
        details["lirpa"] = {"lower_bounds": summary, "open": int(open_.sum())}
        if not open_.any():
            return "unsat", None, "lirpa"

    # Stage 3: mean-value bound and collapse on the initial boxes.
    collapsed = [(lower.clone(), upper.clone()) for _ in rows]
    if bounder.jb is not None:
        with _Stage("jacobian", details, state, clock):
            total_collapsed, mv = 0, {}
            for i, (c, d) in enumerate(rows):
                todo = torch.nonzero(open_[i]).flatten()
                if todo.numel() == 0:
                    continue
                clock.check()
                step = bounder.jacobian(lower[todo], upper[todo], c, d)
                lbs[i][todo] = torch.maximum(lbs[i][todo], step.lower)
                open_[i, todo] = ~proven_rows(lbs[i][todo], d).any(dim=1)
                lo_c, hi_c, n_c = collapse(lower[todo], upper[todo], step.jac_lo, step.jac_hi)
                collapsed[i][0][todo], collapsed[i][1][todo] = lo_c, hi_c
                total_collapsed += int(n_c.sum())
                mv[str(i)] = _nums(step.lower)
            details["jacobian"] = {"mean_value_lower_bounds": mv,
                                   "inputs_collapsed": total_collapsed,
                                   "open": int(open_.sum())}
        if not open_.any():
            return "unsat", None, "jacobian"

    # Stage 4.
    free = max(int(((collapsed[i][1][b] - collapsed[i][0][b]) > 0).sum())
               for i in range(len(rows)) for b in torch.nonzero(open_[i]).flatten().tolist())
    details["free_inputs"] = free
    if not options.bab:
        details["bab_skipped"] = "disabled by options"
        return "unknown", None, "jacobian" if bounder.jb is not None else "lirpa"
    if free > options.bab_max_inputs:
        details["bab_skipped"] = (f"{free} free inputs > bab_max_inputs = "
                                  f"{options.bab_max_inputs}")
        return "unknown", None, "jacobian" if bounder.jb is not None else "lirpa"
    disjuncts = []
    width0 = (upper - lower).max(dim=0).values
    for i, (c, d) in enumerate(rows):
        todo = torch.nonzero(open_[i]).flatten()
        disjuncts.append(Disjunct(i, c, d, collapsed[i][0][todo], collapsed[i][1][todo],
                                  width0))
    bab_method = "crown" if ("crown" in methods or "alpha-crown" in methods) else (
        "ibp" if "ibp" in methods else None)
    if bab_method is None and bounder.jb is None:
        details["bab_skipped"] = "no bounding method enabled (lirpa_methods empty, no jacobian)"
        return "unknown", None, "setup"
    with _Stage("bab", details, state, clock):
        result = branch_and_bound(bounder, spec, disjuncts, batch=int(options.bab_batch),
                                  method=bab_method, falsify_on=options.falsify,
                                  expired=clock.expired, gen=torch_gen)
    details["bab"] = result.stats
    if result.answer == "timeout":
        raise _Timeout
    if result.answer == "sat":
        return "sat", result.witness, "bab-attack"
    return result.answer, None, "bab"


def _falsify(net: Network, spec: VnnlibSpec, lower: torch.Tensor, upper: torch.Tensor,
             rows: list, options: VerifyOptions, clock: _Clock, details: dict, state: dict,
             gen: torch.Generator) -> tuple[tuple | None, str]:
    """Stage 1 on every box and disjunct; ``(witness, stage)`` or ``(None, "")``."""
    best = {}
    with _Stage("falsify-random", details, state, clock):
        pts = torch.cat([falsify.random_points(lo, hi, options.random_points, gen)
                         for lo, hi in zip(lower, upper, strict=True)])
        with torch.no_grad():
            for i, (c, d) in enumerate(rows):
                if c.shape[0] == 0:
                    continue
                v = falsify.violation(net, pts, c, d)
                best[str(i)] = _num(v.min())
                cands = falsify.best_candidates(pts, v, falsify.candidate_slack(d))
                found = recheck(net.checker, spec, cands) if len(cands) else None
                if found is not None:
                    details["falsify"] = {"best_violation_random": best}
                    return found, "falsify-random"
    details["falsify"] = {"best_violation_random": best}
    if options.pgd_steps == 0 or options.pgd_restarts == 0:
        return None, ""
    best_pgd = {}
    with _Stage("falsify-pgd", details, state, clock):
        for i, (c, d) in enumerate(rows):
            if c.shape[0] == 0:
                continue
            x, v = falsify.pgd(net, lower, upper, c, d, steps=int(options.pgd_steps),
                               restarts=int(options.pgd_restarts), gen=gen,
                               should_stop=clock.expired)
            clock.check()
            best_pgd[str(i)] = _num(v.min())
            cands = falsify.best_candidates(x, v, falsify.candidate_slack(d))
            found = recheck(net.checker, spec, cands) if len(cands) else None
            if found is not None:
                details["falsify"]["best_violation_pgd"] = best_pgd
                return found, "falsify-pgd"
    details["falsify"]["best_violation_pgd"] = best_pgd
    return None, ""


__all__ = ["ANSWERS", "PREACT_METHODS", "Verdict", "VerifyOptions", "verify_instance"]
