"""Side by side with the peer: Shi et al. (NeurIPS 2022) local Lipschitz bounds in auto_LiRPA.

What is compared
----------------
For every net, centre and output row j of ``scripts/bench_tightness.py`` (digits-relu and
digits-tanh on the first five test images at eps 0.01 / 0.05; 784-100-100-10 ReLU at eps 0.001 /
0.01 / 0.1; 784-1024-1024-10 ReLU at eps 0.005; the seeded recipe of that script), the certified
upper bound of  max_{|x - x0|_inf <= eps} ||d f_j / dx||_1  from

* ``peer``: auto_LiRPA's GitHub release (the Jacobian bound propagation of Shi et al.), CROWN on
  the forward and backward graph: ``compute_jacobian_bounds(..., optimize=False)`` on the graph
  ``GradNorm(1)(JacobianOP.apply(f(x) @ e_j, x))``, one centre at a time (batches of several
  centres returned point-independent values in release 0.7.1), float64 except on the large net
  (float32, the peer's default);
* ``recurjac`` and ``linear`` of this plugin (``JacobianBounds.lipschitz()``), CROWN
  pre-activation bounds, float64.

The peer is *used*, not copied: give the folder that holds its ``auto_LiRPA`` package (a checkout
or ``git archive`` of github.com/Verified-Intelligence/auto_LiRPA; measured with commit a050a3d,
release 0.7.1) and any folder with its extra pure-Python dependencies (``graphviz``).  It runs in
a subprocess per case with those folders first on ``PYTHONPATH`` (so it shadows the auto_LiRPA
0.3 this project runs on), one thread, and reports its wall time and peak resident memory.
This process runs ours with one thread as well.

    python scripts/bench_peer_shi.py --peer-src /tmp/shi/src --peer-path /tmp/shi/extra
    python scripts/bench_peer_shi.py --peer-src ... --skip-large --json out.json

Printed: per case the mean bound of each method, the ratio ``linear / peer`` (mean, and the
largest over entries), how many entries ``linear`` is tighter / equal (within 1e-6 relative) /
looser than the peer, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cases() -> list[dict]:
    """The nets and centres of bench_tightness as plain layer lists (picklable, no rj_plugin)."""
    from bench_tightness import mlp, recipe_point

    from rj_plugin import load_model
    from rj_plugin.data import load_digits_split

    def layers(model: nn.Module) -> list[tuple]:
        out = []
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                out.append(("linear", mod.weight.detach().double(), mod.bias.detach().double()))
            elif isinstance(mod, nn.ReLU | nn.Tanh):
                out.append((type(mod).__name__.lower(), None, None))
        return out

    found = []
    images, _ = load_digits_split("test")
    for name in ("digits-relu", "digits-tanh"):
        model = layers(load_model(name))
        for eps in (0.01, 0.05):
            found.append({"net": name, "layers": model, "x0": images[:5].double().flatten(1),
                          "eps": eps})
    x0 = recipe_point()
    net = layers(mlp([784, 100, 100, 10]))
    for eps in (0.001, 0.01, 0.1):
        found.append({"net": "784-100-100-10", "layers": net, "x0": x0, "eps": eps})
    found.append({"net": "784-1024-1024-10", "layers": layers(mlp([784, 1024, 1024, 10])),
                  "x0": x0, "eps": 0.005})
    return found


def build(layers: list[tuple], dtype: torch.dtype) -> nn.Sequential:
    mods: list[nn.Module] = []
    for kind, weight, bias in layers:
        if kind == "linear":
            lin = nn.Linear(weight.shape[1], weight.shape[0])
            lin.weight.data, lin.bias.data = weight.clone(), bias.clone()
            mods.append(lin)
        else:
            mods.append({"relu": nn.ReLU, "tanh": nn.Tanh}[kind]())
    return nn.Sequential(*mods).to(dtype).eval()


def peer_case(path: str) -> None:
    """Subprocess: the peer's bounds of one case (pickled at ``path``); JSON on the last line."""
    torch.set_num_threads(1)
    import numpy as np
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.jacobian import GradNorm, JacobianOP
    from auto_LiRPA.perturbations import PerturbationLpNorm

    case = torch.load(path, weights_only=False)
    dtype = torch.float32 if case["net"].startswith("784-1024") else torch.float64
    torch.set_default_dtype(dtype)  # its Jacobian graph starts from an identity of this dtype
    model = build(case["layers"], dtype)
    x0 = case["x0"].to(dtype)
    rows = model[-1].out_features

    class RowGradNorm(nn.Module):
        """||d (f(x) @ mask) / dx||_1 as one graph (the peer's Jacobian operator)."""

        def __init__(self) -> None:
            super().__init__()
            self.model, self.norm = model, GradNorm(norm=1)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.norm(JacobianOP.apply(self.model(x).matmul(mask), x))

    mask = torch.zeros(rows, 1, dtype=dtype)
    start = time.perf_counter()
    bounded = BoundedModule(RowGradNorm(), (BoundedTensor(x0[:1]), mask), device="cpu")
    build_s = time.perf_counter() - start
    values = []
    start = time.perf_counter()
    for p in range(x0.shape[0]):
        row_values = []
        for j in range(rows):
            mask.zero_()
            mask[j, 0] = 1
            x = BoundedTensor(x0[p:p + 1], PerturbationLpNorm(norm=np.inf, eps=case["eps"]))
            upper = bounded.compute_jacobian_bounds((x, mask), optimize=False,
                                                    bound_lower=False)[1]
            row_values.append(float(upper.reshape(())))
        values.append(row_values)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"values": values, "seconds": time.perf_counter() - start,
                      "build_seconds": build_s, "peak_MB": peak_mb}))


def run_peer(case: dict, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([args.peer_src, *args.peer_path,
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.pt")
        torch.save(case, path)
        proc = subprocess.run([sys.executable, __file__, "--peer-case", path], env=env,
                              cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the peer failed on {case['net']} eps {case['eps']}:\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(case: dict) -> dict:
    from rj_plugin import JacobianBounder

    model = build(case["layers"], torch.float64)
    bounder = JacobianBounder(model, input_shape=(case["x0"].shape[1],))
    out = {}
    for method in ("recurjac", "linear"):
        start = time.perf_counter()
        values = [bounder.bound(bounder.region(x0[None], case["eps"]), method=method)
                  .lipschitz()[0].tolist() for x0 in case["x0"]]
        out[method] = {"values": values, "seconds": time.perf_counter() - start}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-src", help="folder holding the peer's auto_LiRPA package")
    ap.add_argument("--peer-path", nargs="*", default=[],
                    help="more folders for the peer's PYTHONPATH (its extra dependencies)")
    ap.add_argument("--skip-large", action="store_true", help="leave out 784-1024-1024-10")
    ap.add_argument("--json", help="write every value here")
    ap.add_argument("--peer-case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_case:
        peer_case(args.peer_case)
        return 0
    if not args.peer_src or not (Path(args.peer_src) / "auto_LiRPA" / "jacobian.py").is_file():
        ap.error("--peer-src must be a folder with the peer's auto_LiRPA/jacobian.py "
                 "(a checkout of github.com/Verified-Intelligence/auto_LiRPA)")
    torch.set_num_threads(1)
    rows, looser_total = [], 0
    print(f"{'net':<18} {'eps':<6} {'peer':>10} {'recurjac':>10} {'linear':>10} "
          f"{'lin/peer':>9} {'max':>7} {'tighter/equal/looser':>21}  seconds (peer, linear)")
    for case in cases():
        if args.skip_large and case["net"].startswith("784-1024"):
            continue
        peer = run_peer(case, args)
        ours = run_ours(case)
        p = torch.tensor(peer["values"], dtype=torch.float64)
        lin = torch.tensor(ours["linear"]["values"], dtype=torch.float64)
        rec = torch.tensor(ours["recurjac"]["values"], dtype=torch.float64)
        ratio = lin / p
        tol = 1e-6 * p.abs()
        tighter = int((lin < p - tol).sum())
        looser = int((lin > p + tol).sum())
        looser_total += looser
        row = {"net": case["net"], "eps": case["eps"], "peer": peer, "ours": ours,
               "ratio_mean": float(ratio.mean()), "ratio_max": float(ratio.max()),
               "tighter": tighter, "looser": looser, "entries": p.numel()}
        rows.append(row)
        print(f"{case['net']:<18} {case['eps']:<6} {p.mean():10.4f} {rec.mean():10.4f} "
              f"{lin.mean():10.4f} {ratio.mean():9.4f} {ratio.max():7.4f} "
              f"{tighter:>7}/{p.numel() - tighter - looser}/{looser:<7}      "
              f"{peer['seconds']:.2f}, {ours['linear']['seconds']:.2f}"
              + (f"  (peer peak {peer['peak_MB']:.0f} MB)" if case["net"].startswith("784-1024")
                 else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nentries where linear is looser than the peer: {looser_total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
