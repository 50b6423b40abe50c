r"""Task ``jacobian``: certified element-wise Jacobian bounds over the region of each input.

For every input x0 and every row j of the output specification (``C f``), the bounds
``L[j, k] <= d (C f)_j / d x_k (x) <= U[j, k]`` hold for all x in the region (an l_p ball or a
box).  Recorded per input: the bounds (``[rows, *input_shape]``, optional), each row's local
Lipschitz bound (dual norm q of the gradient row), the induced-norm bound, the mean / max bound
width ``U - L`` per row, and the share of entries whose sign is certified (``L > 0`` or ``U < 0``).
Plot: heat maps of the widths of row ``task.output_index`` for the first inputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rj_plugin import plots
from rj_plugin.tasks.base import Column, Record, Task, fmt, ok_records, short_id
from rj_plugin.tasks.inputs import InputItem


def region_summary(region: Any) -> dict[str, Any]:
    """Kind, norm and radius of a region (without the center / box arrays)."""
    if region.unbounded:
        return {"kind": "global", "norm": _norm(region.norm)}
    if region.is_box:
        return {"kind": "box", "norm": "inf",
                "mean_width": float((region.upper - region.lower).mean())}
    return {"kind": "ball", "norm": _norm(region.norm), "eps": region.eps}


def _norm(p: float) -> str:
    return "inf" if math.isinf(p) else str(int(p))


class JacobianTask(Task):
    """See the module doc."""

    name = "jacobian"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.check_row("output_index", self.opts["output_index"])
        self._panels: list[tuple[str, Any]] = []

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        ctx = self.ctx
        spec = ctx.spec(label)
        region = ctx.region(item.x, item.box)
        jb = ctx.bound(region, None if spec.kind == "all" else spec.C)
        lo, hi = jb.lower[0].flatten(1), jb.upper[0].flatten(1)  # [rows, d]
        width = hi - lo
        signed = (lo > 0) | (hi < 0)
        result: dict[str, Any] = {
            "rows": spec.names,
            "region": region_summary(region),
            "dual_norm": {"1": "inf", "2": "2", "inf": "1"}[_norm(region.norm)],
            "lipschitz": jb.lipschitz()[0].tolist(),
            "induced_norm": float(jb.induced_norm()[0]),
            "mean_width": width.mean(1).tolist(),
            "max_width": width.amax(1).tolist(),
            "signed_fraction": float(signed.double().mean()),
            "signed_fraction_per_row": signed.double().mean(1).tolist(),
            "timings": dict(jb.timings),
        }
        if self.opts["save_bounds"]:
            result["lower"] = jb.lower[0].tolist()
            result["upper"] = jb.upper[0].tolist()
        row = self.opts["output_index"]
        if len(self._panels) < self.opts["plot_inputs"] and row < len(spec.names):
            img = plots.as_image(width[row].cpu().numpy(), ctx.input_shape)
            self._panels.append((f"input {item.position} ({spec.names[row]})", img))
        return result

    def columns(self) -> list[Column]:
        return [
            Column("rows", lambda r: str(len(r["result"]["rows"]))),
            Column("max Lipschitz", lambda r: fmt(max(r["result"]["lipschitz"]))),
            Column("mean width", lambda r: fmt(sum(r["result"]["mean_width"])
                                               / len(r["result"]["mean_width"]))),
            Column("signed %", lambda r: f"{100 * r['result']['signed_fraction']:.1f}"),
            Column("time s", lambda r: f"{r['seconds']:.2f}"),
        ]

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        header = ["position", "input", "label", "row", "lipschitz", "mean_width", "max_width",
                  "signed_fraction"]
        rows = []
        for r in ok_records(records):
            res = r["result"]
            for j, name in enumerate(res["rows"]):
                rows.append([r["position"], short_id(r), r["label"], name, res["lipschitz"][j],
                             res["mean_width"][j], res["max_width"][j],
                             res["signed_fraction_per_row"][j]])
        return header, rows

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        files = []
        if self.plots and self._panels:
            files.append(plots.width_heatmaps(
                self._panels, self.ctx.results_dir / "jacobian_widths.png",
                f"Jacobian bound widths U - L ({self.ctx.cfg['jacobian']['method']}, "
                f"{self.ctx.cfg['bounds']['method']} pre-activation bounds)"))
        done = ok_records(records)
        summary = {"inputs_ok": len(done)}
        if done:
            summary["mean_signed_fraction"] = sum(r["result"]["signed_fraction"]
                                                  for r in done) / len(done)
        return summary, files
