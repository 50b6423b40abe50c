r"""Task ``lipschitz``: local Lipschitz bounds per output row, and their curve over the radius.

For each input x0 and row j of the output specification, with q the dual norm of the region's p:

* at the configured region (radius ``specification.eps``): ``L_j >= sup_x ||grad (C f)_j(x)||_q``
  from the Jacobian bounds (spec section 4); with ``task.margins`` also for the margins
  ``f_label - f_i`` when the output specification is not already margins;
* the curve ``eps -> L_j(B_p(x0, eps))`` over ``{0} U eps_list`` (or a log range), which grows
  with eps and saturates at a global bound (spec 5b); at eps = 0 it equals the true gradient norm
  (the curve always uses balls around the input's point, for box regions the box midpoint);
* references: the bound over the whole input space (unbounded region) and the naive product of
  operator norms ``||W_m[j,:]||_q prod ||W_l||_{p->p} max|sigma'|``;
* the true ``||grad (C f)_j(x0)||_q`` (autograd), a lower reference;
* which of the bounds of :meth:`JacobianBounds.lipschitz_candidates` was active per row;
* with ``task.refine_seconds``: :func:`rj_plugin.local_lipschitz` (branch and bound over input
  sub-boxes) on the region, reporting a certified ``upper``, an attained ``lower`` and the gap.

Plot (paper's Figure 3 style): log-log curve per plotted row with the two reference lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rj_plugin import plots, refine
from rj_plugin.lipschitz import dual_norm
from rj_plugin.refine import local_lipschitz
from rj_plugin.tasks.base import Column, Record, Task, fmt, ok_records, short_id
from rj_plugin.tasks.context import RunContext, Spec
from rj_plugin.tasks.inputs import InputItem
from rj_plugin.tasks.jacobian import region_summary


def gradient_norms(ctx: RunContext, x0: Tensor, C: Tensor) -> Tensor:
    """``||C J_f(x0)||_q`` per row: the true local gradient norms at x0, ``[rows]``."""
    return refine.gradient_norms(ctx.model, x0[None], C, dual_norm(ctx.norm))[0]


def curve_radii(opts: dict[str, Any]) -> list[float]:
    """``[0] + eps_list`` or ``[0] + logspace(log_start, log_end, log_steps)``, sorted."""
    if opts["eps_list"] is not None:
        radii = sorted(set(float(e) for e in opts["eps_list"]) | {0.0})
    else:
        radii = [0.0] + [float(e) for e in np.logspace(opts["log_start"], opts["log_end"],
                                                        opts["log_steps"])]
    return radii


def curve(ctx: RunContext, x0: Tensor, C: Tensor | None, radii: list[float]) -> Tensor:
    """Lipschitz bounds over ``B_p(x0, r)`` for each radius: ``[len(radii), rows]``."""
    values = [ctx.bound(region, C).lipschitz() for region in ctx.shells(x0, radii)]
    return torch.cat(values, 0)


def global_bounds(ctx: RunContext, x0: Tensor, C: Tensor | None, method: str | None = None
                  ) -> tuple[Tensor, Tensor]:
    """``(whole-space bound [rows], operator-norm product [rows])``."""
    region = ctx.bounder.region(x0[None], norm=ctx.norm_name, unbounded=True)
    jb = ctx.bound(region, C, method)
    lip = jb.lipschitz()[0]
    naive = jb.operator_norm_product().reshape(-1, lip.shape[0])[0]
    return lip, naive


class LipschitzTask(Task):
    """See the module doc."""

    name = "lipschitz"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        for row in self.opts["plot_rows"] or []:
            self.check_row("plot_rows", row)
        self._global_cache: dict[bytes, tuple[list[float], list[float]]] = {}
        self._plotted = 0
        self._files: list[Path] = []

    def _plot_rows(self, spec: Spec, label: int | None) -> list[int]:
        if self.opts["plot_rows"] is not None:
            return list(self.opts["plot_rows"])
        if spec.kind == "all" and label is not None and label < spec.rows:
            return [label]
        return [0]

    def _global(self, x0: Tensor, spec: Spec) -> tuple[list[float], list[float]]:
        key = spec.C.cpu().numpy().tobytes()
        if key not in self._global_cache:
            lip, naive = global_bounds(self.ctx, x0, None if spec.kind == "all" else spec.C)
            self._global_cache[key] = (lip.tolist(), naive.tolist())
        return self._global_cache[key]

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        ctx, opts = self.ctx, self.opts
        spec = ctx.spec(label)
        C = None if spec.kind == "all" else spec.C
        region = ctx.region(item.x, item.box)
        jb = ctx.bound(region, C)
        candidates = jb.lipschitz_candidates()
        names = list(candidates)
        active = torch.stack([candidates[n] for n in names]).argmin(0)[0]
        result: dict[str, Any] = {
            "rows": spec.names,
            "region": region_summary(region),
            "lipschitz": jb.lipschitz()[0].tolist(),
            "active_bound": [names[int(k)] for k in active],
            "gradient_norm_at_x0": gradient_norms(ctx, item.x, spec.C).tolist(),
            "timings": dict(jb.timings),
        }
        if opts["margins"] and spec.kind != "margins" and label is not None and ctx.n_out > 1:
            mspec = ctx.margins_spec(label)
            if spec.kind == "all":
                lm = jb.lipschitz(mspec.C)[0]
            else:
                lm = ctx.bound(region, mspec.C).lipschitz()[0]
            result["margins"] = {"rows": mspec.names, "lipschitz": lm.tolist()}
        if opts["refine_seconds"] is not None:
            method = ctx.cfg["jacobian"]["method"]
            where = ({"lower": region.lower, "upper": region.upper} if region.is_box else
                     {"x0": region.center, "eps": region.eps, "norm": region.norm})
            ref = local_lipschitz(ctx.bounder, **where, C=C,
                                  method="linear" if method == "interval" else method,
                                  preact=ctx.cfg["bounds"]["method"],
                                  time_limit=opts["refine_seconds"], rel_gap=opts["refine_gap"],
                                  seed=ctx.cfg["general"]["seed"])
            result["refined"] = {"upper": ref.upper[0].tolist(), "lower": ref.lower[0].tolist(),
                                 "gap": ref.gap[0].tolist(), "status": ref.status[0],
                                 "boxes": ref.boxes[0], "seconds": ref.seconds[0]}
        if opts["curve"]:
            radii = curve_radii(opts)
            values = curve(ctx, item.x, C, radii)
            result["curve"] = {"eps": radii, "lipschitz": values.tolist()}
        if opts["global_reference"]:
            glob, naive = self._global(item.x, spec)
            result["global"] = glob
            result["operator_norm_product"] = naive
        if self.plots and opts["curve"] and self._plotted < opts["plot_inputs"]:
            self._plot(item, label, spec, result)
        return result

    def _plot(self, item: InputItem, label: int | None, spec: Spec, res: dict) -> None:
        rows = self._plot_rows(spec, label)
        values = np.asarray(res["curve"]["lipschitz"])
        curves = {spec.names[j]: values[:, j] for j in rows}
        glob = {spec.names[j]: res["global"][j] for j in rows} if "global" in res else None
        naive = ({spec.names[j]: res["operator_norm_product"][j] for j in rows}
                 if "global" in res else None)
        zero = {spec.names[j]: res["gradient_norm_at_x0"][j] for j in rows}
        path = self.ctx.results_dir / f"lipschitz_curve_{item.position}.png"
        q = {"1": "inf", "2": "2", "inf": "1"}[self.ctx.norm_name]
        self._files.append(plots.lipschitz_curve(
            res["curve"]["eps"], curves, path,
            f"input {item.position} (label {label}): l_{self.ctx.norm_name} balls, bound on "
            f"||grad||_{q}", glob, naive, zero))
        self._plotted += 1

    def columns(self) -> list[Column]:
        cols = [
            Column("max L(eps)", lambda r: fmt(max(r["result"]["lipschitz"]))),
            Column("max |grad| x0", lambda r: fmt(max(r["result"]["gradient_norm_at_x0"]))),
        ]
        if self.opts["refine_seconds"] is not None:
            cols.append(Column("refined max L",
                               lambda r: fmt(max(r["result"]["refined"]["upper"]))))
            cols.append(Column("found max |grad|",
                               lambda r: fmt(max(r["result"]["refined"]["lower"]))))
        if self.opts["margins"]:
            cols.append(Column("max L margins", lambda r: fmt(
                max(r["result"]["margins"]["lipschitz"])) if "margins" in r["result"] else "-"))
        if self.opts["curve"]:
            cols.append(Column("max L(eps_max)", lambda r: fmt(
                max(r["result"]["curve"]["lipschitz"][-1]))))
        if self.opts["global_reference"]:
            cols.append(Column("max global", lambda r: fmt(max(r["result"]["global"]))))
            cols.append(Column("max op-norm prod",
                               lambda r: fmt(max(r["result"]["operator_norm_product"]))))
        return cols

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        header = ["position", "input", "label", "row", "eps", "lipschitz", "kind"]
        rows = []
        for r in ok_records(records):
            res = r["result"]
            base = [r["position"], short_id(r), r["label"]]
            eps = res["region"].get("eps")
            for j, name in enumerate(res["rows"]):
                rows.append([*base, name, eps, res["lipschitz"][j], "region"])
            if "refined" in res:
                for j, name in enumerate(res["rows"]):
                    rows.append([*base, name, eps, res["refined"]["upper"][j], "refined_upper"])
                    rows.append([*base, name, eps, res["refined"]["lower"][j], "refined_lower"])
            for j, name in enumerate(res.get("margins", {}).get("rows", [])):
                rows.append([*base, name, eps, res["margins"]["lipschitz"][j], "region"])
            if "curve" in res:
                for e, vals in zip(res["curve"]["eps"], res["curve"]["lipschitz"], strict=True):
                    for j, name in enumerate(res["rows"]):
                        rows.append([*base, name, e, vals[j], "curve"])
            if "global" in res:
                for j, name in enumerate(res["rows"]):
                    rows.append([*base, name, None, res["global"][j], "global"])
                    rows.append([*base, name, None, res["operator_norm_product"][j],
                                 "operator_norm_product"])
        return header, rows

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        return {"inputs_ok": len(ok_records(records))}, list(self._files)
