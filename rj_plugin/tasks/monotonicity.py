r"""Task ``monotonicity``: which outputs are monotone in which input features on the region.

For a row j of the output specification and an input feature k (flat index), over the region:

* "increasing" (non-decreasing in x_k) is **certified** when the Jacobian lower bound
  ``L[j, k] >= 0``, and **refuted** by a point x of the region with ``d (C f)_j / d x_k (x) < 0``;
* "decreasing" (non-increasing) likewise with ``U[j, k] <= 0`` / a point with a positive entry;
* otherwise the claim is **unknown**.

Counter-points are searched among random points of the region (uniform, plus random corners for
boxes and l_inf balls), then by projected gradient steps that push the entry towards the wrong
sign (useful for smooth activations; for piecewise-linear ones the Jacobian is piecewise
constant and the random points carry the search).  True Jacobians come from autograd.  A claim
that is both certified and refuted would expose an unsound bound: it is reported as
``conflict``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rj_plugin import attacks, plots
from rj_plugin.tasks.base import Column, Record, Task, ok_records, short_id
from rj_plugin.tasks.context import RunContext
from rj_plugin.tasks.inputs import InputItem

_CODES = {name: code for name, (code, _) in plots.MONOTONE_CATEGORIES.items()}


def spec_jacobians(model: Any, xs: Tensor, C: Tensor) -> Tensor:
    """``C J_f(x)`` at every point: ``xs [N, *in]`` -> ``[N, rows, d]`` (torch.func)."""
    def single(x: Tensor) -> Tensor:
        return model(x[None])[0] @ C.T

    return torch.func.vmap(torch.func.jacrev(single))(xs).flatten(2)


class MonotonicityTask(Task):
    """See the module doc."""

    name = "monotonicity"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        for j in self.opts["outputs"] or []:
            self.check_row("outputs", j)
        bad = [k for k in self.opts["features"] or [] if k >= ctx.dim]
        if bad:
            raise ctx.cfg.error("task.features", f"feature {bad[0]} does not exist: the input "
                                                 f"has {ctx.dim} elements")
        self.directions = (["increasing", "decreasing"] if self.opts["direction"] == "both"
                           else [self.opts["direction"]])
        self._grid: tuple[np.ndarray, list[str], list[str], int] | None = None

    # -- counter-points ----------------------------------------------------------------------

    def _sample(self, item: InputItem, region: Any) -> Tensor:
        ctx, n = self.ctx, self.opts["samples"]
        parts = [item.x[None]]
        if region.is_box:
            lo, hi = region.lower[0], region.upper[0]
            parts += [attacks.sample_box(lo, hi, n, ctx.gen),
                      attacks.sample_box(lo, hi, max(1, n // 4), ctx.gen, corners=True)]
        else:
            parts.append(attacks.sample_ball(item.x, region.eps, ctx.norm, n, ctx.gen))
            if math.isinf(ctx.norm):
                lo, hi = item.x - region.eps, item.x + region.eps
                parts.append(attacks.sample_box(lo, hi, max(1, n // 4), ctx.gen, corners=True))
        return torch.cat(parts)

    def _project(self, x: Tensor, item: InputItem, region: Any) -> Tensor:
        if region.is_box:
            return torch.maximum(torch.minimum(x, region.upper), region.lower)
        return item.x + attacks.project(x - item.x, region.eps, self.ctx.norm)

    def _ascent(self, item: InputItem, region: Any, C: Tensor,
                claims: list[tuple[int, int, float]]) -> tuple[Tensor, Tensor]:
        """Projected gradient steps minimising ``s * J[j, k]`` per claim ``(j, k, s)``.

        Returns the final points ``[P, *in]`` and their values ``s * J[j, k]`` ``[P]``.
        """
        ctx = self.ctx
        rows = torch.tensor([c[0] for c in claims], device=ctx.device)
        cols = torch.tensor([c[1] for c in claims], device=ctx.device)
        sgn = torch.tensor([c[2] for c in claims], dtype=ctx.dtype, device=ctx.device)
        if region.is_box:
            x = attacks.sample_box(region.lower[0], region.upper[0], len(claims), ctx.gen)
        else:
            x = attacks.sample_ball(item.x, region.eps, ctx.norm, len(claims), ctx.gen)
        size = (region.upper - region.lower).abs().max() / 2 if region.is_box else region.eps
        step = float(size) / 4
        for _ in range(self.opts["ascent_steps"]):
            x = x.detach().requires_grad_(True)
            jac = spec_jacobians(ctx.model, x, C)
            val = jac[torch.arange(len(claims), device=ctx.device), rows, cols] * sgn
            (grad,) = torch.autograd.grad(val.sum(), x, allow_unused=True)
            if grad is None or not torch.isfinite(grad).all() or grad.abs().max() == 0:
                break
            with torch.no_grad():
                move = step * attacks.steepest_direction(grad, ctx.norm)
                x = self._project(x - move, item, region)
            step *= 0.85
        with torch.no_grad():
            jac = spec_jacobians(ctx.model, x.detach(), C)
            val = jac[torch.arange(len(claims), device=ctx.device), rows, cols] * sgn
        return x.detach(), val

    # -- the task ----------------------------------------------------------------------------

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        ctx, opts = self.ctx, self.opts
        spec = ctx.spec(label)
        outputs = opts["outputs"] if opts["outputs"] is not None else list(range(spec.rows))
        features = opts["features"] if opts["features"] is not None else list(range(ctx.dim))
        region = ctx.region(item.x, item.box)
        jb = ctx.bound(region, None if spec.kind == "all" else spec.C)
        lower, upper = jb.lower[0].flatten(1), jb.upper[0].flatten(1)
        points = self._sample(item, region)
        jac = spec_jacobians(ctx.model, points, spec.C)  # [N, rows, d]
        jmin, jarg_min = jac.min(0)
        jmax, jarg_max = jac.max(0)
        claims: list[dict[str, Any]] = []
        for j in outputs:
            for k in features:
                for direction in self.directions:
                    inc = direction == "increasing"
                    cert = bool(lower[j, k] >= 0) if inc else bool(upper[j, k] <= 0)
                    wrong = float(jmin[j, k]) if inc else float(jmax[j, k])
                    refuted = wrong < 0 if inc else wrong > 0
                    claim = {"output": j, "row": spec.names[j], "feature": k,
                             "direction": direction, "lower": float(lower[j, k]),
                             "upper": float(upper[j, k])}
                    if refuted:
                        idx = int(jarg_min[j, k] if inc else jarg_max[j, k])
                        claim["witness_value"] = wrong
                        if ctx.dim <= 64:
                            claim["witness_point"] = points[idx].flatten().tolist()
                    claim["status"] = ("conflict" if cert and refuted else "certified" if cert
                                       else "refuted" if refuted else "unknown")
                    claims.append(claim)
        unknown = [c for c in claims if c["status"] == "unknown"]
        if unknown and opts["ascent_steps"] > 0 and opts["max_ascent_claims"] > 0:
            chosen = unknown[:opts["max_ascent_claims"]]
            spec3 = [(c["output"], c["feature"], 1.0 if c["direction"] == "increasing" else -1.0)
                     for c in chosen]
            xs, vals = self._ascent(item, region, spec.C, spec3)
            for c, x, v in zip(chosen, xs, vals, strict=True):
                if float(v) < 0:
                    c["status"] = "refuted"
                    c["witness_value"] = float(v) * (1 if c["direction"] == "increasing" else -1)
                    if ctx.dim <= 64:
                        c["witness_point"] = x.flatten().tolist()
        counts = {s: sum(c["status"] == s for c in claims)
                  for s in ("certified", "refuted", "unknown", "conflict")}
        if self._grid is None:
            self._grid = (self._categories(claims, outputs, features), [spec.names[j] for j in
                                                                       outputs],
                          [str(k) for k in features], item.position)
        return {"rows": spec.names, "outputs": outputs, "features": features,
                "samples": len(points), "claims": claims, "counts": counts,
                "timings": dict(jb.timings)}

    def _categories(self, claims: list[dict], outputs: list[int], features: list[int]
                    ) -> np.ndarray:
        grid = np.zeros((len(outputs), len(features)), dtype=int)
        pos_j = {j: i for i, j in enumerate(outputs)}
        pos_k = {k: i for i, k in enumerate(features)}
        state: dict[tuple[int, int], dict[str, str]] = {}
        for c in claims:
            state.setdefault((c["output"], c["feature"]), {})[c["direction"]] = c["status"]
        for (j, k), st in state.items():
            inc, dec = st.get("increasing"), st.get("decreasing")
            if inc == "certified" and dec == "certified":
                cat = "constant"
            elif inc == "certified":
                cat = "non-decreasing"
            elif dec == "certified":
                cat = "non-increasing"
            elif "refuted" in (inc, dec) and all(s in (None, "refuted") for s in (inc, dec)):
                cat = "refuted"
            else:
                cat = "unknown"
            grid[pos_j[j], pos_k[k]] = _CODES[cat]
        return grid

    def columns(self) -> list[Column]:
        return [
            Column("claims", lambda r: str(len(r["result"]["claims"]))),
            Column("certified", lambda r: str(r["result"]["counts"]["certified"])),
            Column("refuted", lambda r: str(r["result"]["counts"]["refuted"])),
            Column("unknown", lambda r: str(r["result"]["counts"]["unknown"])),
            Column("conflict", lambda r: str(r["result"]["counts"]["conflict"])),
            Column("time s", lambda r: f"{r['seconds']:.1f}"),
        ]

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        header = ["position", "input", "label", "row", "feature", "direction", "status",
                  "lower", "upper", "witness_value"]
        rows = []
        for r in ok_records(records):
            for c in r["result"]["claims"]:
                rows.append([r["position"], short_id(r), r["label"], c["row"], c["feature"],
                             c["direction"], c["status"], c["lower"], c["upper"],
                             c.get("witness_value")])
        return header, rows

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        done = ok_records(records)
        totals = {s: sum(r["result"]["counts"][s] for r in done)
                  for s in ("certified", "refuted", "unknown", "conflict")}
        files = []
        if self.plots and self._grid is not None:
            grid, rows, feats, pos = self._grid
            files.append(plots.monotonicity_grid(
                grid, rows, feats, self.ctx.results_dir / "monotonicity.png",
                f"input {pos}: certified / refuted monotonicity per (output, feature)"))
        return {"inputs_ok": len(done), **totals}, files
