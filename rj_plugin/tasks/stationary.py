r"""Task ``stationary``: the largest ball on which one output provably has no stationary point.

For row j of the output specification (``task.output_index``) and a ball ``B_p(x0, R)``, the
Jacobian bounds ``L_k <= d (C f)_j / d x_k <= U_k`` give (spec 5c)

    n_uns(R) = #{k : L_k < 0 < U_k}      (entries of uncertain sign)
    n_signed(R) = #{k : L_k > 0 or U_k < 0}  (entries of certified non-zero sign)

If ``n_signed >= 1`` the gradient has a component that keeps one strict sign on the whole ball,
so ``(C f)_j`` has no stationary point there.  (The spec's test is ``n_uns < d``; it agrees
except when some bound is exactly 0, e.g. a dead ReLU path, where ``n_uns < d`` would wrongly
accept a zero derivative -- we use the strict count.)  The largest such R is searched with
:func:`~rj_plugin.tasks.search.largest_radius` (capped at ``max_radius``); then
``scan_points`` radii in ``[0, R_max]`` record n_uns and the Lipschitz bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rj_plugin import plots
from rj_plugin.tasks.base import Column, Record, Task, fmt, ok_records, short_id
from rj_plugin.tasks.context import RunContext
from rj_plugin.tasks.inputs import InputItem
from rj_plugin.tasks.search import largest_radius


def sign_counts(lower: Tensor, upper: Tensor) -> tuple[int, int]:
    """``(n_uns, n_signed)`` of one row's bounds ``[d]``."""
    return int(((lower < 0) & (upper > 0)).sum()), int(((lower > 0) | (upper < 0)).sum())


class StationaryTask(Task):
    """See the module doc."""

    name = "stationary"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.check_row("output_index", self.opts["output_index"])
        self._curves: list[tuple[str, list[float], list[int], list[float]]] = []

    def _row(self, spec_kind: str, label: int | None, rows: int) -> int:
        if self.opts["output_index"] is not None:
            return self.opts["output_index"]
        if spec_kind == "all" and label is not None and label < rows:
            return label
        return 0

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        ctx, opts = self.ctx, self.opts
        spec = ctx.spec(label)
        row = self._row(spec.kind, label, spec.rows)
        C = spec.C[row:row + 1]
        x0 = item.x

        def certified(radius: float) -> bool:
            jb = ctx.bound(ctx.ball(x0, radius), C)
            return sign_counts(jb.lower[0, 0].flatten(), jb.upper[0, 0].flatten())[1] >= 1

        found = largest_radius(certified, opts["start_eps"], steps=opts["steps"],
                               tolerance=opts["tolerance"], max_radius=opts["max_radius"])
        radius = found.radius
        result: dict[str, Any] = {
            "row": spec.names[row], "row_index": row, "radius": radius,
            "capped": radius >= opts["max_radius"],
            "searches": [[r, ok] for r, ok in found.evaluations],
        }
        if radius > 0:
            jb = ctx.bound(ctx.ball(x0, radius), C)
            lo, hi = jb.lower[0, 0].flatten(), jb.upper[0, 0].flatten()
            n_uns, n_signed = sign_counts(lo, hi)
            signs = torch.where(lo > 0, 1, torch.where(hi < 0, -1, 0))
            k = int(torch.nonzero(signs)[0]) if n_signed else None
            result.update({"n_uns": n_uns, "n_signed": n_signed,
                           "lipschitz": float(jb.lipschitz()[0, 0]),
                           "certified_feature": k,
                           "certified_sign": int(signs[k]) if k is not None else None})
        if opts["scan_points"] > 0 and radius > 0:
            radii = [float(r) for r in np.linspace(0.0, radius, opts["scan_points"])]
            n_uns_list, lips = [], []
            for region in ctx.shells(x0, radii):
                jb = ctx.bound(region, C)
                lips += jb.lipschitz()[:, 0].tolist()
                for b in range(jb.batch):
                    n_uns_list.append(sign_counts(jb.lower[b, 0].flatten(),
                                                  jb.upper[b, 0].flatten())[0])
            result["scan"] = {"radius": radii, "n_uns": n_uns_list, "lipschitz": lips}
            self._curves.append((f"input {item.position}", radii, n_uns_list, lips))
        return result

    def columns(self) -> list[Column]:
        return [
            Column("row", lambda r: r["result"]["row"]),
            Column("R_max", lambda r: fmt(r["result"]["radius"])
                   + (" (cap)" if r["result"]["capped"] else "")),
            Column("n_uns", lambda r: fmt(r["result"].get("n_uns"))),
            Column("L(R_max)", lambda r: fmt(r["result"].get("lipschitz"))),
            Column("time s", lambda r: f"{r['seconds']:.1f}"),
        ]

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        header = ["position", "input", "label", "row", "radius", "capped", "n_uns", "n_signed",
                  "lipschitz", "certified_feature", "certified_sign"]
        rows = []
        for r in ok_records(records):
            res = r["result"]
            rows.append([r["position"], short_id(r), r["label"], res["row"], res["radius"],
                         res["capped"], res.get("n_uns"), res.get("n_signed"),
                         res.get("lipschitz"), res.get("certified_feature"),
                         res.get("certified_sign")])
        return header, rows

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        done = ok_records(records)
        summary: dict[str, Any] = {"inputs_ok": len(done)}
        if done:
            summary["mean_radius"] = sum(r["result"]["radius"] for r in done) / len(done)
        files = []
        if self.plots and self._curves:
            files.append(plots.stationary_scan(
                self._curves[:8], self.ctx.dim, self.ctx.results_dir / "stationary_scan.png",
                f"no stationary point within R_max (l_{self.ctx.norm_name} balls)"))
        return summary, files
