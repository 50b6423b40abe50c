r"""Task ``robustness``: the largest certified radius per input, by several certificates.

The property is ``g(x) = C f(x) >= 0`` row-wise: the margins ``f_c - f_j`` of the label c against
all other classes (or one target), or the rows of a matrix C.  Certificates for a radius R:

* ``integral`` (RecurJac, spec 5a): with ``r_k = k R / S``, ``k = 1..S`` (S = ``lipsteps``) and
  ``L_k`` the Lipschitz bound of each row over ``B_p(x0, r_k)`` (Jacobian bounds of the
  ``jacobian`` section on pre-activation bounds of the ``bounds`` section),
  ``g(x) >= g(x0) - sum_k L_k R / S`` on ``B_p(x0, R)``; R is certified iff that budget is >= 0
  for every row.  (Every point at distance in ``(r_{k-1}, r_k]`` lies in ``B_p(x0, r_k)``.)
* ``ibp`` | ``crown`` | ``crown-ibp`` | ``alpha-crown``: auto_LiRPA's lower bound of ``C f``
  over ``B_p(x0, R)`` is >= 0 for every row.

Each is searched with :func:`~rj_plugin.tasks.search.largest_radius` (start at ``start_eps``,
x10 / /10 until bracketed, then bisection), and ``best`` is the largest per input.  As an upper
reference, PGD looks for the smallest radius with a violating point (``attacks``): any certified
radius must lie below it.  An input whose ``g(x0)`` already has a negative row (misclassified)
gets radius 0 everywhere.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rj_plugin import plots
from rj_plugin.attacks import smallest_adversarial_radius
from rj_plugin.tasks.base import Column, Record, Task, fmt, ok_records, short_id
from rj_plugin.tasks.context import RunContext
from rj_plugin.tasks.inputs import InputItem
from rj_plugin.tasks.search import largest_radius

_LABELS = {"integral": "RecurJac", "ibp": "IBP", "crown": "CROWN", "crown-ibp": "CROWN-IBP",
           "alpha-crown": "a-CROWN"}


def method_label(ctx: RunContext, method: str) -> str:
    """Table name of a certificate (the integral is named after its Jacobian algorithm)."""
    if method == "integral":
        return {"recurjac": "RecurJac", "fastlip": "Fast-Lip", "interval": "Interval"}[
            ctx.cfg["jacobian"]["method"]]
    return _LABELS[method]


def integral_budget(ctx: RunContext, x0: Tensor, C: Tensor, g0: Tensor, radius: float,
                    steps: int) -> Tensor:
    """``g(x0) - sum_k L_k R / S`` per row, ``[k]`` (spec 5a)."""
    radii = [radius * (k + 1) / steps for k in range(steps)]
    lips = torch.cat([ctx.bound(region, C).lipschitz() for region in ctx.shells(x0, radii)], 0)
    return g0 - lips.sum(0) * (radius / steps)


class RobustnessTask(Task):
    """See the module doc."""

    name = "robustness"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.methods: list[str] = list(self.opts["methods"])

    def _certifier(self, method: str, x0: Tensor, C: Tensor, g0: Tensor):
        ctx, opts = self.ctx, self.opts
        if method == "integral":
            return lambda r: bool((integral_budget(ctx, x0, C, g0, r, opts["lipsteps"])
                                   >= 0).all())
        return lambda r: bool((ctx.output_lower(x0, r, C, method) >= 0).all())

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        ctx, opts = self.ctx, self.opts
        spec = ctx.spec(label)
        C, x0 = spec.C, item.x
        g0 = ctx.predict(x0[None])[0] @ C.T
        result: dict[str, Any] = {"rows": spec.names, "margin_at_x0": g0.tolist(),
                                  "violated_at_x0": bool((g0 < 0).any()), "radii": {},
                                  "searches": {}, "timings": {}}
        eps = ctx.cfg["specification"]["eps"]
        if eps > 0:
            jb = ctx.bound(ctx.ball(x0, eps), C)
            result["lipschitz_at_eps"] = {"eps": eps, "per_row": jb.lipschitz()[0].tolist()}
        for method in self.methods:
            start = time.perf_counter()
            if result["violated_at_x0"]:
                radius, evals = 0.0, []
            else:
                found = largest_radius(self._certifier(method, x0, C, g0), opts["start_eps"],
                                       steps=opts["steps"], tolerance=opts["tolerance"],
                                       max_radius=opts["max_radius"])
                radius, evals = found.radius, found.evaluations
            result["radii"][method] = radius
            result["searches"][method] = [[r, ok] for r, ok in evals]
            result["timings"][method] = time.perf_counter() - start
        best = max(self.methods, key=lambda m: result["radii"][m])
        result["best"] = result["radii"][best]
        result["best_method"] = best
        if opts["pgd"]:
            start = time.perf_counter()
            found = smallest_adversarial_radius(
                ctx.forward, x0, C, ctx.norm, opts["start_eps"],
                search_steps=opts["pgd_search_steps"], max_radius=opts["max_radius"],
                steps=opts["pgd_steps"], restarts=opts["pgd_restarts"], gen=ctx.gen)
            result["pgd"] = {"radius": found.radius if math.isfinite(found.radius) else None,
                             "attacks": [list(a) for a in found.attacks]}
            if found.x_adv is not None and ctx.dim <= 64:
                result["pgd"]["x_adv"] = found.x_adv.tolist()
            result["timings"]["pgd"] = time.perf_counter() - start
        return result

    def columns(self) -> list[Column]:
        cols = [Column("pred", lambda r: fmt(r["predicted"]))]
        if self.ctx.cfg["specification"]["eps"] > 0:
            eps = self.ctx.cfg["specification"]["eps"]
            cols.append(Column(f"L(eps={eps:g})", lambda r: fmt(max(
                r["result"]["lipschitz_at_eps"]["per_row"]))))
        for m in self.methods:
            cols.append(Column(f"r {method_label(self.ctx, m)}",
                               lambda r, m=m: fmt(r["result"]["radii"][m])))
        if len(self.methods) > 1:
            cols.append(Column("r best", lambda r: fmt(r["result"]["best"])))
        if self.opts["pgd"]:
            cols.append(Column("r PGD", lambda r: fmt(r["result"]["pgd"]["radius"])))
        cols.append(Column("time s", lambda r: f"{r['seconds']:.1f}"))
        return cols

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        header = ["position", "input", "label", "predicted", "lipschitz_at_eps",
                  *[f"radius_{m}" for m in self.methods], "radius_best", "best_method",
                  "radius_pgd"]
        rows = []
        for r in ok_records(records):
            res = r["result"]
            lip = res.get("lipschitz_at_eps")
            rows.append([r["position"], short_id(r), r["label"], r["predicted"],
                         max(lip["per_row"]) if lip else None,
                         *[res["radii"][m] for m in self.methods], res["best"],
                         res["best_method"], res.get("pgd", {}).get("radius")])
        return header, rows

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        done = ok_records(records)
        summary: dict[str, Any] = {"inputs_ok": len(done)}
        if not done:
            return summary, []
        for m in [*self.methods, "best"]:
            vals = [r["result"]["radii"][m] if m != "best" else r["result"]["best"]
                    for r in done]
            summary[f"mean_radius_{m}"] = sum(vals) / len(vals)
        if self.opts["pgd"]:
            pgd = [r["result"]["pgd"]["radius"] for r in done]
            finite = [v for v in pgd if v is not None]
            summary["pgd_found"] = len(finite)
        files = []
        if self.plots:
            radii = {method_label(self.ctx, m): [r["result"]["radii"][m] for r in done]
                     for m in self.methods}
            if len(self.methods) > 1:
                radii["best"] = [r["result"]["best"] for r in done]
            pgd = ([r["result"]["pgd"]["radius"] for r in done] if self.opts["pgd"]
                   else [None] * len(done))
            files.append(plots.radii_bars(
                [f"{short_id(r)} (y={r['label']})" for r in done], radii, pgd,
                self.ctx.results_dir / "robustness_radii.png",
                f"certified l_{self.ctx.norm_name} radius per input vs PGD"))
        return summary, files
