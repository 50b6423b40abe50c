r"""Task ``global-lipschitz``: Lipschitz bounds over the whole input space vs the naive product.

Every pre-activation range is (-inf, inf), so each sigma' takes its global range (spec section 2)
and the Jacobian bounds hold for every input.  Per row j of the output specification (and per
Jacobian algorithm in ``task.methods``) the bound on ``sup_x ||grad (C f)_j(x)||_q`` is compared
with ``||W_m[j,:]||_q prod_l ||W_l||_{p->p} max|sigma_l'|`` (spec 5b).  The input only matters
through its label (margins); results are computed once per distinct specification.
Plot: grouped bars per row (log scale) for the first input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rj_plugin import plots
from rj_plugin.tasks.base import Column, Record, Task, fmt, ok_records, short_id
from rj_plugin.tasks.context import RunContext
from rj_plugin.tasks.inputs import InputItem
from rj_plugin.tasks.lipschitz import global_bounds


class GlobalLipschitzTask(Task):
    """See the module doc."""

    name = "global-lipschitz"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self._cache: dict[bytes, dict[str, Any]] = {}
        self._first: dict[str, Any] | None = None

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        spec = self.ctx.spec(label)
        key = spec.C.cpu().numpy().tobytes()
        if key not in self._cache:
            bounds: dict[str, list[float]] = {}
            naive = None
            for method in self.opts["methods"]:
                lip, naive = global_bounds(self.ctx, item.x,
                                           None if spec.kind == "all" else spec.C, method)
                bounds[method] = lip.tolist()
            naive_l = naive.tolist()
            best = [min(v[j] for v in bounds.values()) for j in range(spec.rows)]
            self._cache[key] = {
                "rows": spec.names,
                "norm": self.ctx.norm_name,
                "bounds": bounds,
                "operator_norm_product": naive_l,
                "ratio": [n / b if b > 0 else None for n, b in zip(naive_l, best, strict=True)],
            }
        result = dict(self._cache[key])
        if self._first is None:
            self._first = result
        return result

    def columns(self) -> list[Column]:
        cols = [Column(f"max {m}", lambda r, m=m: fmt(max(r["result"]["bounds"][m])))
                for m in self.opts["methods"]]
        cols.append(Column("max op-norm prod",
                           lambda r: fmt(max(r["result"]["operator_norm_product"]))))
        cols.append(Column("min ratio", lambda r: fmt(min(
            (x for x in r["result"]["ratio"] if x is not None), default=None))))
        return cols

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        header = ["position", "input", "label", "row", "method", "bound"]
        rows = []
        for r in ok_records(records):
            res = r["result"]
            for j, name in enumerate(res["rows"]):
                for method, vals in res["bounds"].items():
                    rows.append([r["position"], short_id(r), r["label"], name, method, vals[j]])
                rows.append([r["position"], short_id(r), r["label"], name,
                             "operator_norm_product", res["operator_norm_product"][j]])
        return header, rows

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        files = []
        if self.plots and self._first is not None:
            res = self._first
            values = {**res["bounds"], "operator-norm product": res["operator_norm_product"]}
            files.append(plots.global_bars(
                res["rows"], values, self.ctx.results_dir / "global_lipschitz.png",
                f"global Lipschitz bounds (l_{res['norm']} input norm) vs the operator-norm "
                "product"))
        return {"distinct_specifications": len(self._cache)}, files
