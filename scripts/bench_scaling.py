"""Scaling benchmark: RecurJac vs Fast-Lip vs plain intervals on random ReLU MLPs.

What is measured
----------------
Networks: ``784 -> width x (depth - 1) -> 10`` ReLU MLPs from ``rj_plugin.models.build_mlp``
(``depth`` = number of linear layers), PyTorch default initialisation after
``torch.manual_seed(seed)``; one input x0 ~ U[0, 1]^784 (batch 1, same x0 for every net); an
l_inf ball of radius ``--eps`` (0.005).  Everything runs on the CPU in ``--dtype``.

Per net, the pre-activation bounds (``--preact``, CROWN by default) are computed ONCE, timed,
and reported in their own column (``preact_s``).  Every ``bound()`` call after that reuses them
(``CachedPreactBounder`` memoises ``derivative_ranges``), so for each method (recurjac, fastlip,
interval) the time is the Jacobian phase alone, ``jb.timings['jacobian_s']`` as recorded by
``JacobianBounder.bound``; the median over ``--repeats`` runs (methods interleaved) is reported.
Also reported: the l_inf-region Lipschitz bound ``jb.lipschitz()`` (l1 dual norm, mean over the
10 outputs; the l1 merge's extra chain is NOT part of ``jacobian_s``) and the share of Jacobian
entries whose sign the bounds leave open (L <= 0 <= U).  Times and Lipschitz values are also
given as RATIOS to fastlip measured in the same process on the same net: the machine is shared,
so absolute seconds are noisy and only same-process ratios should be compared.

Memory (two numbers, both reported)
-----------------------------------
* ``big_MB``: bytes of the largest single working tensor of the Jacobian phase, computed
  analytically from the shapes the algorithm allocates: RecurJac, one ``[B, c, 2K, n]`` chunk of
  chains (K set by ``rj_plugin.recurjac.DEFAULT_MAX_ELEMENTS``, so at most 2^19 elements) or a
  clamped weight copy ``W+``/``W-`` of its Fast-Lip intersection step; Fast-Lip, the clamped
  weight copies (its ``[B, c, n]`` bounds are smaller); intervals, the ``[B, n_k, 784]`` corner
  products or a clamped weight.  A handful of such tensors are alive at once, so the measured
  peak is a small multiple of this.
* ``rss_MB``: the measured peak resident-set growth of the process during one ``bound()`` call
  (max over repeats).  ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` cannot
  be reset, so on Linux the kernel's high-water mark is reset by writing ``5`` to
  ``/proc/self/clear_refs`` and ``VmHWM - VmRSS(before)`` is read from ``/proc/self/status``;
  freed heap memory is first returned to the OS with glibc's ``malloc_trim(0)`` so that reused
  pages count again.  The kernel updates the counters in steps of a few pages, so values below
  ~1 MB are noise.  Where ``clear_refs`` is not writable the growth of ``ru_maxrss`` is used
  instead (it only shows new process-wide peaks; the header says which mode is active).
The pre-activation (CROWN) phase is not part of either number.

Threads
-------
``--threads`` defaults to 1.  The machine this was written on has 2 cores shared with other
people's processes; with torch's default of one OpenMP thread per core, any other busy process
makes the threads wait on each other, and small ops were measured 10-100x slower than with one
thread (Fast-Lip on a 784-128-128-128-10 net: ~0.3 s with 2 threads vs ~1.5 ms with 1).  The
reference case adds a float64 row with the other thread count (1 if ``--threads`` is not 1, else
all CPUs) outside ``--quick``.

Limits
------
A net is skipped, with a note, when its rough memory estimate (weights + CROWN's backward
matrices + a few of the largest working tensors) exceeds ``--max-gb``, or when its estimated
RecurJac time (flop count / throughput measured at start-up, times ``--repeats``) exceeds
``--max-seconds-per-net``.  The default grid (widths 64..1024, depths 2..7) stays well inside
both limits (7.6 minutes with the reference case, float64, 1 thread, on 2 shared cores; 31 s per
RecurJac call at width 1024, depth 7), so nothing is skipped by default; the limits guard larger
user grids.  The time estimate adds an elementwise term to the matmul flops and is scaled by one
calibration call on a 784-128-128-128-10 net; it came within ~15% of the measured time at width
1024 and up to ~2-3x low on the small nets (per-op overheads).

Reference case (run first; ``--no-reference`` skips it, ``--reference-only`` runs only it)
---------------------------------------------------------------------------------------------
784-1024-1024-10 ReLU MLP, default init, x0 ~ U[0,1], l_inf eps 0.005, CROWN pre-activations:
RecurJac time for the full 10 x 784 Jacobian through the plain public API (a fresh
``JacobianBounder`` per dtype, float64 and float32), first call vs second call (there is no JIT
to warm up), the median of ``--repeats`` further calls, the same with one thread, the share of
uncertain-sign entries, and the Lipschitz ratio to Fast-Lip.  The authors' numba implementation
figure is QUOTED (a constant, not measured here) beside our measured time.

Usage::

    python scripts/bench_scaling.py                     # reference case + full grid
    python scripts/bench_scaling.py --quick             # smoke run, under a minute
    python scripts/bench_scaling.py --widths 64 128 256 512 --depths 2 3 4 5 --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import io
import math
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rj_plugin import lipschitz as lip
from rj_plugin import recurjac as rj
from rj_plugin.api import METHODS, JacobianBounder, JacobianBounds
from rj_plugin.io.results import atomic_write_text
from rj_plugin.lirpa import PREACT_METHODS
from rj_plugin.models import build_mlp
from rj_plugin.region import Region

N_IN, N_OUT = 784, 10
DEFAULT_WIDTHS = (64, 128, 256, 512, 1024)
DEFAULT_DEPTHS = (2, 3, 4, 5, 6, 7)
QUICK_WIDTHS = (64, 128)
QUICK_DEPTHS = (2, 3, 4)
REFERENCE_HIDDEN = (1024, 1024)

#: Quoted, NOT measured here: the RecurJac authors' numba implementation on the reference case
#: (784-1024-1024-10, full 10 x 784 Jacobian), single-threaded, on this machine kind.
QUOTED_NUMBA_SECONDS = 2.6
#: Quoted, NOT measured here: numba's JIT compilation before that first call.
QUOTED_NUMBA_JIT_SECONDS = 90.0

CSV_FIELDS = (
    "section", "width", "depth", "method", "dtype", "eps", "preact", "threads", "repeats",
    "status", "note", "preact_s", "jacobian_s", "jacobian_s_all", "time_ratio_vs_fastlip",
    "lipschitz_mean", "lipschitz_ratio_vs_fastlip", "uncertain_share", "unstable_share",
    "largest_tensor_bytes", "est_bytes", "rss_peak_delta_bytes",
)


# ----------------------------------------------------------------------------------------------
# memory measurement


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None  # glibc only


_LIBC = _libc()
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in {_STATUS}")
    return int(match.group(1))


def _can_reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident-set growth of this process over a ``with`` block, in bytes (``.delta``).

    Mode ``vmhwm``: reset the kernel's high-water mark (``/proc/self/clear_refs`` <- 5), read
    ``VmHWM`` after the block minus ``VmRSS`` before.  Mode ``ru_maxrss``: growth of
    ``getrusage().ru_maxrss`` (only new process-wide peaks show up; coarse).
    """

    mode = "vmhwm" if _can_reset_hwm() else "ru_maxrss"

    def __init__(self) -> None:
        self.delta = 0
        self._before = 0

    def __enter__(self) -> PeakRSS:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        if self.mode == "vmhwm":
            _CLEAR_REFS.write_text("5")
            self._before = _status_kb("VmRSS") * 1024
        else:
            self._before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode == "vmhwm":
            after = _status_kb("VmHWM") * 1024
        else:
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.delta = max(0, after - self._before)


# ----------------------------------------------------------------------------------------------
# analytic estimates


def layer_sizes(width: int, depth: int) -> list[int]:
    """``[n_0, ..., n_m]`` of the benchmark MLP with ``depth`` linear layers."""
    return [N_IN] + [width] * (depth - 1) + [N_OUT]


def largest_tensor_elements(sizes: list[int], method: str, batch: int = 1,
                            max_elements: int = rj.DEFAULT_MAX_ELEMENTS) -> int:
    """Elements of the largest working tensor ``method`` allocates (see the module docstring).

    Interval matrix products clamp a weight into ``W+`` and ``W-`` (two weight-sized copies):
    Fast-Lip (and RecurJac's Fast-Lip intersection) for the edges into hidden layers, plain
    intervals for the edges out of hidden layers.
    """
    c, hidden = sizes[-1], sizes[1:-1]
    if not hidden:
        return batch * c * sizes[0]
    edges = list(zip(sizes[:-1], sizes[1:], strict=True))  # (n_s, n_t)
    into_hidden = max(a * b for a, b in edges[:-1])
    out_of_hidden = max(a * b for a, b in edges[1:])
    rows = batch * c * max(sizes[:-1])  # one [B, c, n_s] bound
    if method == "recurjac":
        widest = max(hidden)
        per_col = batch * c * 2 * widest  # recurjac_backward's chunking rule
        cols = min(max(1, max_elements // per_col), max(sizes[:-2]))
        return max(batch * c * 2 * cols * widest, into_hidden, rows)
    if method == "fastlip":
        return max(into_hidden, rows)
    return max(batch * max(hidden) * sizes[0], out_of_hidden)  # interval: [B, n_k, n_0]


def estimate_bytes(sizes: list[int], itemsize: int, batch: int = 1) -> int:
    """Rough peak bytes of one net: weights (x3 copies), CROWN's backward matrices, and six of
    the largest working tensors of the most demanding method."""
    weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    crown = 4 * batch * max(sizes[1:]) * max(sizes[:-1])
    work = 6 * max(largest_tensor_elements(sizes, m, batch) for m in METHODS)
    return itemsize * (3 * weights + crown + work)


def recurjac_work(sizes: list[int], batch: int = 1) -> tuple[float, float]:
    """``(matmul_flops, elementwise_elements)`` of RecurJac's chains on this net.

    Each chain step at hidden layer t touches the ``[B, c, 2 * n_{l-1}, n_t]`` chain block a few
    times elementwise (counted once here; ``Throughput`` prices a step's passes together) and,
    below the last hidden layer, pushes it through ``W_{t+1}`` with one matmul.
    """
    m, c = len(sizes) - 1, sizes[-1]
    flops = elems = 0.0
    for level in range(1, m):
        chains = batch * c * 2 * sizes[level - 1]
        for t in range(level, m):
            elems += chains * sizes[t]
            if t < m - 1:
                flops += 2 * chains * sizes[t] * sizes[t + 1]
    return flops, elems


@dataclass
class Throughput:
    """Measured speed of this process on the shapes RecurJac's chains use (for time estimates)."""

    gflops: float  # matmul, GFLOP/s
    step_ns: float  # elementwise work of one chain step, ns per chain-block element
    factor: float = 1.0  # measured / modelled time of a real RecurJac call (clamped to [1, 4])

    @classmethod
    def measure(cls, dtype: torch.dtype, eps: float, preact: str, seed: int) -> Throughput:
        """Median of 5 runs of a chain-shaped matmul and of one step's elementwise passes."""
        n = 512
        rows = 2 * max(1, rj.DEFAULT_MAX_ELEMENTS // (2 * N_OUT * n))
        w = torch.rand(1, N_OUT, rows, n, dtype=dtype) - 0.5
        weight = torch.rand(n, n, dtype=dtype)
        coef = torch.rand(1, N_OUT, 1, n, dtype=dtype)
        mm, ew = [], []
        for _ in range(5):
            start = time.perf_counter()
            w @ weight
            mm.append(time.perf_counter() - start)
            start = time.perf_counter()
            w_pos = w.clamp(min=0)  # the passes of one upper_chain step
            (w @ coef.transpose(-1, -2)) + (w_pos @ coef.transpose(-1, -2))
            (w * coef).addcmul_(w_pos, coef)
            ew.append(time.perf_counter() - start)
        speed = cls(2 * w.numel() * n / max(statistics.median(mm), 1e-9) / 1e9,
                    statistics.median(ew) / w.numel() * 1e9)
        # Calibrate the model on one real call through the public API (784-128-128-128-10).
        sizes = [N_IN, 128, 128, 128, N_OUT]
        bounder = CachedPreactBounder(make_net(sizes[1], len(sizes) - 1, seed), dtype=dtype,
                                      input_shape=(N_IN,))
        region = bounder.region(make_x0(seed).to(dtype), eps, "inf")
        bounder.derivative_ranges(region, preact)
        measured = bounder.bound(region, preact=preact, method="recurjac").timings["jacobian_s"]
        speed.factor = min(4.0, max(1.0, measured / speed.recurjac_seconds(sizes)))
        return speed

    def recurjac_seconds(self, sizes: list[int]) -> float:
        """Estimated seconds of one RecurJac call on the net with these layer sizes."""
        flops, elems = recurjac_work(sizes)
        return self.factor * (flops / (self.gflops * 1e9) + elems * self.step_ns * 1e-9)


# ----------------------------------------------------------------------------------------------
# bounding


class CachedPreactBounder(JacobianBounder):
    """A ``JacobianBounder`` whose ``derivative_ranges`` is computed once per (region, options).

    Lets ``bound()`` be called repeatedly (methods x repeats) while timing only the Jacobian
    phase; the first ``derivative_ranges`` call is the one to time.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._ranges: dict[tuple, tuple[Region, tuple[list[Tensor], list[Tensor]]]] = {}

    def derivative_ranges(self, region: Region, preact: str, alpha_iterations: int = 20,
                          alpha_lr: float = 0.1) -> tuple[list[Tensor], list[Tensor]]:
        key = (id(region), preact, alpha_iterations, alpha_lr)
        if key not in self._ranges:  # the region is kept alive, so its id is not reused
            ranges = super().derivative_ranges(region, preact, alpha_iterations, alpha_lr)
            self._ranges[key] = (region, ranges)
        return self._ranges[key][1]


def make_net(width: int, depth: int, seed: int) -> torch.nn.Sequential:
    """The benchmark MLP (PyTorch default init after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    return build_mlp(N_IN, [width] * (depth - 1), N_OUT, "relu")


def make_x0(seed: int) -> Tensor:
    """x0 ~ U[0, 1]^784, batch 1, from its own generator (the same for every net)."""
    return torch.rand(1, N_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def uncertain_share(jb: JacobianBounds) -> float:
    """Share of Jacobian entries with L <= 0 <= U (sign left open, as in the l1 merge)."""
    lower, upper = jb.lower.flatten(2), jb.upper.flatten(2)
    return float((lip.fixed_signs(lower, upper) == 0).double().mean())


def unstable_share(g_lo: list[Tensor], g_hi: list[Tensor]) -> float:
    """Share of hidden neurons whose derivative range is not a single value."""
    total = sum(g.numel() for g in g_lo)
    if total == 0:
        return 0.0
    return sum(int((lo != hi).sum()) for lo, hi in zip(g_lo, g_hi, strict=True)) / total


@dataclass
class MethodResult:
    """One method on one net."""

    method: str
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    lipschitz: float = math.nan
    uncertain: float = math.nan

    @property
    def time(self) -> float:
        return statistics.median(self.times)


def run_net(width: int, depth: int, args: argparse.Namespace, x0: Tensor
            ) -> tuple[float, float, dict[str, MethodResult]]:
    """Bound one net with every method; returns ``(preact_s, unstable_share, results)``."""
    bounder = CachedPreactBounder(make_net(width, depth, args.seed), input_shape=(N_IN,),
                                  dtype=args.torch_dtype)
    region = bounder.region(x0.to(args.torch_dtype), args.eps, "inf")
    start = time.perf_counter()
    g_lo, g_hi = bounder.derivative_ranges(region, args.preact)
    preact_s = time.perf_counter() - start
    results = {m: MethodResult(m) for m in METHODS}
    for rep in range(args.repeats):
        order = METHODS if rep % 2 == 0 else METHODS[::-1]  # interleave against drift
        for method in order:
            with PeakRSS() as peak:
                jb = bounder.bound(region, preact=args.preact, method=method)
            res = results[method]
            res.times.append(jb.timings["jacobian_s"])
            res.rss.append(peak.delta)
            if rep == 0:
                res.lipschitz = float(jb.lipschitz().mean())
                res.uncertain = uncertain_share(jb)
            del jb
    return preact_s, unstable_share(g_lo, g_hi), results


# ----------------------------------------------------------------------------------------------
# output


def _mb(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def write_csv(path: str | None, rows: list[dict]) -> None:
    """Write all rows so far to ``path`` atomically (no-op without a path)."""
    if not path:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def progress(msg: str) -> None:
    """One progress line on stderr, flushed."""
    print(msg, file=sys.stderr, flush=True)


def out(msg: str = "") -> None:
    """One line on stdout, flushed."""
    print(msg, flush=True)


def _common(args: argparse.Namespace) -> dict:
    return {"dtype": args.dtype, "eps": args.eps, "preact": args.preact,
            "threads": torch.get_num_threads(), "repeats": args.repeats}


def reference_case(args: argparse.Namespace, rows: list[dict]) -> None:
    """The 784-1024-1024-10 reference case through the plain public API (module docstring)."""
    hidden = list(REFERENCE_HIDDEN)
    out("== Reference case: 784-1024-1024-10 ReLU, PyTorch default init (seed "
        f"{args.seed}), x0 ~ U[0,1]^784, l_inf eps {args.eps}, {args.preact} pre-activations, "
        "full 10 x 784 Jacobian")
    out(f"   QUOTED, not measured here: authors' numba RecurJac {QUOTED_NUMBA_SECONDS:.1f} s "
        f"single-threaded, after ~{QUOTED_NUMBA_JIT_SECONDS:.0f} s of numba JIT")
    out(f"   {'dtype':7} {'thr':>3} {'preact_s':>8} {'1st_call':>8} {'2nd_call':>8} "
        f"{'median':>8} {'quoted/ours':>11} {'uncertain':>9} {'unstable':>8} "
        f"{'L_rj':>9} {'L_rj/L_fl':>9}")
    threads = torch.get_num_threads()
    settings = [(torch.float64, threads), (torch.float32, threads)]
    other = 1 if threads != 1 else (os.cpu_count() or 1)
    if other != threads and not args.quick:  # the extra thread count is not part of --quick
        settings.append((torch.float64, other))
    x0 = make_x0(args.seed)
    for dtype, nthreads in settings:
        torch.set_num_threads(nthreads)
        model = make_net(hidden[0], len(hidden) + 1, args.seed)
        bounder = JacobianBounder(model, input_shape=(N_IN,), dtype=dtype)
        region = bounder.region(x0.to(dtype), args.eps, "inf")
        calls, preacts = [], []
        jb = None
        for _ in range(2 + args.repeats):
            jb = bounder.bound(region, preact=args.preact, method="recurjac")
            calls.append(jb.timings["jacobian_s"])
            preacts.append(jb.timings["preact_s"])
        rj_l = float(jb.lipschitz().mean())
        fl = bounder.bound(region, preact=args.preact, method="fastlip")
        fl_l = float(fl.lipschitz().mean())
        g_lo, g_hi = bounder.derivative_ranges(region, args.preact)
        med = statistics.median(calls[2:]) if args.repeats else calls[1]
        name = str(dtype).removeprefix("torch.")
        unc, unst = uncertain_share(jb), unstable_share(g_lo, g_hi)
        out(f"   {name:7} {nthreads:>3} {statistics.median(preacts):8.3f} {calls[0]:8.3f} "
            f"{calls[1]:8.3f} {med:8.3f} {QUOTED_NUMBA_SECONDS / med:10.1f}x "
            f"{unc:9.3f} {unst:8.3f} {rj_l:9.3f} {rj_l / fl_l:9.3f}")
        rows.append({**_common(args), "section": "reference", "width": 1024, "depth": 3,
                     "method": "recurjac", "dtype": name, "threads": nthreads, "status": "ok",
                     "note": f"first call {calls[0]:.4f} s, second {calls[1]:.4f} s",
                     "preact_s": statistics.median(preacts), "jacobian_s": med,
                     "jacobian_s_all": ";".join(f"{t:.5f}" for t in calls),
                     "lipschitz_mean": rj_l, "lipschitz_ratio_vs_fastlip": rj_l / fl_l,
                     "uncertain_share": unc, "unstable_share": unst})
        write_csv(args.csv, rows)
    torch.set_num_threads(threads)
    out("   preact_s: median CROWN time per call; 1st/2nd_call: jacobian_s of the first and "
        "second bound() on a fresh JacobianBounder; median: of the next --repeats calls; "
        "quoted/ours: quoted numba seconds / our median (>1: ours faster); uncertain: share of "
        "Jacobian entries with L <= 0 <= U; unstable: share of hidden ReLUs with unknown state")
    out()


def grid(args: argparse.Namespace, rows: list[dict]) -> None:
    """The width x depth grid (module docstring)."""
    itemsize = torch.empty((), dtype=args.torch_dtype).element_size()
    speed = Throughput.measure(args.torch_dtype, args.eps, args.preact, args.seed)
    out(f"== Grid: widths {args.widths}, depths {args.depths}, {args.dtype}, l_inf eps "
        f"{args.eps}, preact {args.preact}, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}; memory mode {PeakRSS.mode}; matmul ~{speed.gflops:.1f} GFLOP/s, "
        f"time-model factor {speed.factor:.2f}")
    out(f"{'width':>5} {'depth':>5} {'method':9} {'preact_s':>8} {'jac_s':>9} {'t/fastlip':>9} "
        f"{'L1-Lip':>11} {'L/fastlip':>9} {'uncert':>6} {'big_MB':>8} {'rss_MB':>8}")
    nets = [(w, d) for w in args.widths for d in args.depths]
    x0 = make_x0(args.seed)
    t_start = time.perf_counter()
    summary: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    for i, (width, depth) in enumerate(nets, 1):
        sizes = layer_sizes(width, depth)
        est = estimate_bytes(sizes, itemsize)
        est_call = speed.recurjac_seconds(sizes)
        est_s = est_call * args.repeats
        base = {**_common(args), "section": "grid", "width": width, "depth": depth,
                "est_bytes": est}
        skip = None
        if est > args.max_gb * 2**30:
            skip = f"estimated memory {est / 2**30:.3g} GB > --max-gb {args.max_gb:g}"
        elif est_s > args.max_seconds_per_net:
            skip = (f"estimated RecurJac time {est_s:.0f} s > --max-seconds-per-net "
                    f"{args.max_seconds_per_net:g}")
        if skip:
            out(f"{width:5d} {depth:5d} skipped: {skip}")
            rows.append({**base, "status": "skipped", "note": skip})
            write_csv(args.csv, rows)
            continue
        preact_s, unstable, results = run_net(width, depth, args, x0)
        ref = results["fastlip"]
        for method in METHODS:
            res = results[method]
            t_ratio, l_ratio = _ratio(res.time, ref.time), _ratio(res.lipschitz, ref.lipschitz)
            big = largest_tensor_elements(sizes, method) * itemsize
            summary[method].append((t_ratio, l_ratio))
            out(f"{width:5d} {depth:5d} {method:9} {preact_s:8.3f} {res.time:9.4f} "
                f"{t_ratio:9.2f} {res.lipschitz:11.4g} {l_ratio:9.3f} {res.uncertain:6.3f} "
                f"{_mb(big)} {_mb(max(res.rss))}")
            rows.append({**base, "method": method, "status": "ok", "preact_s": preact_s,
                         "jacobian_s": res.time,
                         "jacobian_s_all": ";".join(f"{t:.5f}" for t in res.times),
                         "time_ratio_vs_fastlip": t_ratio, "lipschitz_mean": res.lipschitz,
                         "lipschitz_ratio_vs_fastlip": l_ratio, "uncertain_share": res.uncertain,
                         "unstable_share": unstable, "largest_tensor_bytes": big,
                         "rss_peak_delta_bytes": max(res.rss)})
        write_csv(args.csv, rows)
        progress(f"[{i}/{len(nets)}] width {width} depth {depth}: preact {preact_s:.3f} s, "
                 f"recurjac {results['recurjac'].time:.3f} s (estimated {est_call:.3f} s), "
                 f"unstable ReLUs {unstable:.3f}, elapsed {time.perf_counter() - t_start:.0f} s")
    out()
    if not summary["fastlip"]:
        out("No net was run.")
        return
    out("Summary over nets (ratios to fastlip on the same net, same process): "
        "median [min, max]")
    for method in METHODS:
        pairs = summary[method]
        if not pairs or method == "fastlip":
            continue
        t, lr = [p[0] for p in pairs], [p[1] for p in pairs]
        out(f"  {method:9} time x{statistics.median(t):.2f} [{min(t):.2f}, {max(t):.2f}]   "
            f"Lipschitz x{statistics.median(lr):.3f} [{min(lr):.3f}, {max(lr):.3f}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help=f"hidden widths (default {' '.join(map(str, DEFAULT_WIDTHS))})")
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help=f"linear layers, >= 2 (default {' '.join(map(str, DEFAULT_DEPTHS))})")
    p.add_argument("--eps", type=float, default=0.005, help="l_inf radius (default %(default)s)")
    p.add_argument("--preact", default="crown", choices=PREACT_METHODS,
                   help="pre-activation bound method (default %(default)s)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="grid dtype (default %(default)s; the reference case runs both)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per method, median reported (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"small grid (widths {QUICK_WIDTHS}, depths {QUICK_DEPTHS}, 1 repeat "
                        "unless --repeats is given)")
    p.add_argument("--csv", default=None, help="write all results to this CSV (atomically)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default %(default)s; 0: torch's own default); see the "
                        "module docstring")
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="skip nets whose estimated memory exceeds this (default %(default)s)")
    p.add_argument("--max-seconds-per-net", type=float, default=300.0,
                   help="skip nets whose estimated RecurJac time x repeats exceeds this "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="init and x0 seed (default %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference case")
    p.add_argument("--reference-only", action="store_true", help="run only the reference case")
    args = p.parse_args(argv)
    if args.quick:
        args.widths = args.widths or list(QUICK_WIDTHS)
        args.depths = args.depths or list(QUICK_DEPTHS)
        if "--repeats" not in (argv if argv is not None else sys.argv[1:]):
            args.repeats = 1
    args.widths = args.widths or list(DEFAULT_WIDTHS)
    args.depths = args.depths or list(DEFAULT_DEPTHS)
    if min(args.depths) < 2 or min(args.widths) < 1 or args.repeats < 1 or args.eps <= 0:
        p.error("need depths >= 2, widths >= 1, repeats >= 1 and eps > 0")
    if args.no_reference and args.reference_only:
        p.error("--no-reference and --reference-only exclude each other")
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the reference case and/or the grid; print tables; optionally write the CSV."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out(f"bench_scaling: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs visible, dtype {args.dtype}")
    rows: list[dict] = []
    if not args.no_reference:
        reference_case(args, rows)
    if not args.reference_only:
        grid(args, rows)
    if args.csv:
        out(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
