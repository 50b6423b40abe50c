r"""Stage 4: input-space branch and bound.

Each unsafe disjunct ``C y <= d`` keeps a stack of sub-boxes (``lower, upper: [Q, n]``) still to
prove.  One step pops up to ``batch`` of them and

1. bounds them with LiRPA (CROWN; one auto_LiRPA call for the whole batch) and drops every box
   on which some row has a certified lower bound of ``g_i = c_i . f - d_i`` above the tolerance
   (:func:`rj_plugin.verify.prove.proven_rows`);
2. bounds the rest with the Jacobian stage (one RecurJac call): the mean-value bound may prove
   more boxes, and inputs in which every row is certified monotone are fixed to the minimising
   face (:func:`rj_plugin.verify.prove.collapse`);
3. attacks the rest: the centres and a short PGD from each box; a point whose violation is small
   enough is re-checked on onnxruntime (:func:`rj_plugin.verify.witness.recheck`);
4. splits the rest in two along the input with the largest ``max(|L_rj|, |U_rj|) w_j`` (row r
   the most promising, ``w`` the box's widths; without stage 3 the widest input relative to the
   initial box); a box that was just collapsed goes back unsplit, to be bounded on its face.

The disjunct is impossible on the whole input set exactly when its stack empties, and every box
leaves the stack only through a certified bound (steps 1-2) or by being replaced by sub-boxes
that cover it (step 4) or by a face that the collapse argument covers it with.  The instance is
``unsat`` when every stack empties, ``sat`` when a witness re-checks, ``timeout`` at the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rj_plugin.io.vnnlib import VnnlibSpec
from rj_plugin.verify import falsify
from rj_plugin.verify.prove import SpecBounder, collapse, proven_rows
from rj_plugin.verify.witness import recheck

#: Above this many queued sub-boxes the search gives up (``unknown``).
MAX_QUEUE = 2_000_000


@dataclass
class Disjunct:
    """One unsafe disjunct and its pending sub-boxes.

    Attributes:
        C, d: ``[k, m]``, ``[k]`` float64.
        lower, upper: ``[Q, n]``: sub-boxes not yet proven.
        width0: ``[n]``: widths of the initial boxes (the largest), for the split heuristic.
    """

    index: int
    C: Tensor
    d: Tensor
    lower: Tensor
    upper: Tensor
    width0: Tensor

    def pop(self, count: int) -> tuple[Tensor, Tensor]:
        q = self.lower.shape[0]
        lo, hi = self.lower[max(0, q - count):], self.upper[max(0, q - count):]
        self.lower, self.upper = self.lower[:max(0, q - count)], self.upper[:max(0, q - count)]
        return lo, hi

    def push(self, lower: Tensor, upper: Tensor) -> None:
        if lower.shape[0]:
            self.lower = torch.cat([self.lower, lower])
            self.upper = torch.cat([self.upper, upper])


@dataclass
class BabResult:
    """Outcome of :func:`branch_and_bound`.

    Attributes:
        answer: ``unsat`` | ``sat`` | ``timeout`` | ``unknown``.
        witness: ``(x, y)`` re-checked on onnxruntime, for sat.
        stats: JSON-friendly counters (boxes bounded, proven by LiRPA / Jacobian, inputs
            collapsed, splits, batches, largest queue, attacks, reason for unknown).
    """

    answer: str
    witness: tuple[np.ndarray, np.ndarray] | None = None
    stats: dict = field(default_factory=dict)


def split(lower: Tensor, upper: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """Halve each box ``[B, n]`` along ``argmax score`` (``[B, n]``; a width-0 input never
    scores) -> two children per box, ``[2B, n]`` (the halves share the mid plane)."""
    width = upper - lower
    score = torch.where(width > 0, score, torch.full_like(score, -1.0))
    dim = score.argmax(dim=1)
    rows = torch.arange(lower.shape[0], device=lower.device)
    mid = (lower[rows, dim] + upper[rows, dim]) / 2
    up_left = upper.clone()
    up_left[rows, dim] = mid
    lo_right = lower.clone()
    lo_right[rows, dim] = mid
    return torch.cat([lower, lo_right]), torch.cat([up_left, upper])


def branch_and_bound(bounder: SpecBounder, spec: VnnlibSpec, disjuncts: list[Disjunct], *,
                     batch: int, method: str | None, falsify_on: bool,
                     expired: Callable[[float], bool], gen: torch.Generator) -> BabResult:
    """Run stage 4 until every disjunct's stack is empty, a witness is found, or time is up.

    Args:
        bounder: built once per instance.
        spec: for the witness re-check.
        disjuncts: one per unsafe disjunct (with the sub-boxes stages 2-3 left open).
        batch: sub-boxes per auto_LiRPA call.
        method: LiRPA method for the sub-boxes (``crown`` | ``ibp`` | None: Jacobian only).
        falsify_on: attack unproven sub-boxes.
        expired: the deadline test ``expired(reserve)``, polled before every batch with the
            expected length of the batch (1.5 x the longest so far).
    """
    stats = {"boxes_bounded": 0, "proven_lirpa": 0, "proven_jacobian": 0,
             "inputs_collapsed": 0, "splits": 0, "batches": 0, "max_queue": 0,
             "attack_points": 0, "stuck_boxes": 0}
    pending = [dj for dj in disjuncts if dj.lower.shape[0]]
    turn, longest = 0, 0.0
    while pending:
        if expired(1.5 * longest):
            return BabResult("timeout", None, stats)
        t0 = time.perf_counter()
        dj = pending[turn % len(pending)]
        turn += 1
        lo, hi = dj.pop(batch)
        stats["batches"] += 1
        stats["boxes_bounded"] += lo.shape[0]
        lb = torch.full((lo.shape[0], dj.C.shape[0]), -torch.inf, dtype=lo.dtype,
                        device=lo.device)
        if method is not None:
            lb = bounder.lirpa(lo, hi, dj.C, dj.d, method)
            done = proven_rows(lb, dj.d).any(dim=1)
            stats["proven_lirpa"] += int(done.sum())
            lo, hi, lb = lo[~done], hi[~done], lb[~done]
        score = (hi - lo) / dj.width0.clamp(min=1e-300)
        newly = torch.zeros(lo.shape[0], dtype=torch.long, device=lo.device)
        best_row = lb.argmax(dim=1)
        if bounder.jb is not None and lo.shape[0]:
            step = bounder.jacobian(lo, hi, dj.C, dj.d)
            lb = torch.maximum(lb, step.lower)
            done = proven_rows(lb, dj.d).any(dim=1)
            stats["proven_jacobian"] += int(done.sum())
            keep = ~done
            lo, hi, lb = lo[keep], hi[keep], lb[keep]
            jlo, jhi = step.jac_lo[keep], step.jac_hi[keep]
            lo, hi, newly = collapse(lo, hi, jlo, jhi)
            stats["inputs_collapsed"] += int(newly.sum())
            best_row = lb.argmax(dim=1)
            rows = torch.arange(lo.shape[0], device=lo.device)
            jr_lo, jr_hi = jlo[rows, best_row], jhi[rows, best_row]
            score = torch.maximum(jr_lo.abs(), jr_hi.abs()) * (hi - lo)
            # fall back to relative widths where the derivative bounds say nothing
            flat = ~(score > 0).any(dim=1, keepdim=True)
            score = torch.where(flat, (hi - lo) / dj.width0.clamp(min=1e-300), score)
        if lo.shape[0] == 0:
            if dj.lower.shape[0] == 0:
                pending.remove(dj)
            longest = max(longest, time.perf_counter() - t0)
            continue
        if falsify_on:
            found = _attack(bounder, spec, dj, lo, hi, stats, gen)
            if found is not None:
                return BabResult("sat", found, stats)
        stuck = (hi - lo).max(dim=1).values <= 1e-12 * (1 + hi.abs().max(dim=1).values)
        if stuck.any():  # a point box that no bound proves: give up on it, say unknown
            stats["stuck_boxes"] += int(stuck.sum())
            return BabResult("unknown", None, {**stats, "reason":
                             "a sub-box shrank to a point without a proof or a witness"})
        again = newly > 0
        dj.push(lo[again], hi[again])
        left, right = split(lo[~again], hi[~again], score[~again])
        stats["splits"] += int((~again).sum())
        dj.push(left, right)
        queued = sum(int(p.lower.shape[0]) for p in pending)
        stats["max_queue"] = max(stats["max_queue"], queued)
        if queued > MAX_QUEUE:
            return BabResult("unknown", None, {**stats, "reason":
                             f"more than {MAX_QUEUE} sub-boxes pending"})
        if dj.lower.shape[0] == 0:
            pending.remove(dj)
        longest = max(longest, time.perf_counter() - t0)
    return BabResult("unsat", None, stats)


def _attack(bounder: SpecBounder, spec: VnnlibSpec, dj: Disjunct, lo: Tensor, hi: Tensor,
            stats: dict, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Centres and short PGD on the unproven sub-boxes; re-check the best candidates."""
    net = bounder.net
    with torch.no_grad():
        centres = (lo + hi) / 2
        v = falsify.violation(net, centres, dj.C, dj.d)
    pts, vals = [centres], [v]
    if lo.shape[0] <= 4096:
        x_best, v_best = falsify.pgd(net, lo, hi, dj.C, dj.d, steps=8, restarts=1, gen=gen)
        pts.append(x_best)
        vals.append(v_best)
    x, v = torch.cat(pts), torch.cat(vals)
    stats["attack_points"] += int(x.shape[0])
    cands = falsify.best_candidates(x, v, falsify.candidate_slack(dj.d))
    if len(cands) == 0:
        return None
    return recheck(net.checker, spec, cands)
