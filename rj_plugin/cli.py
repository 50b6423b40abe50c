"""The ``rj`` command line.

    rj jacobian --model net.onnx --center x0.npy --eps 0.1 --norm inf --preact crown \\
                --method recurjac --output out.json
    rj jacobian --model net.onnx --vnnlib prop.vnnlib --output out.json      # the vnnlib box(es)
    rj jacobian --model net.pt --input-shape 1,28,28 --center x0.npy --eps 0.1  # shape not in .pt
    rj run configs/digits-lipschitz.yaml --set data.end=3                   # a YAML-configured task
    rj demo                                                                  # bundled digits MLPs
    rj verify --model net.onnx --vnnlib prop.vnnlib --timeout 60 --results out.txt  # one instance
    rj vnncomp ../shared/data/vnncomp/test --output runs/test     # benchmark folders (VNN-COMP)
    rj score runs/test/results.csv ../shared/data/vnncomp/test    # +10 right, -150 wrong

Every failure is one line on stderr naming the problem (``rj: error: ...``) and exit status 2;
options that need no model (device, alpha-CROWN settings, the output path) are checked before
anything is loaded or computed, and result files are written atomically, so a failed run
leaves none behind.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rj_plugin.errors import InputError, RJError

if TYPE_CHECKING:
    from rj_plugin.api import JacobianBounder

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _load_array(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if p.suffix in (".txt", ".csv"):
            return np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=1)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(f"cannot read {what} file {path}: {exc}") from None
    raise InputError(f"{what} file {path}: unknown extension {p.suffix!r} (use .npy, .txt, .csv)")


def parse_shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: ``"1,28,28"`` (also ``1x28x28``, ``[1, 28, 28]``) or ``"5"`` -> a
    tuple of positive integers; InputError naming the option otherwise."""
    body = text.strip().strip("[]()").replace("x", ",")
    parts = [t.strip() for t in body.split(",")]
    if parts and parts[-1] == "":  # "5," is a one-dimensional shape
        parts.pop()
    try:
        dims = tuple(int(t) for t in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise InputError(f"--input-shape {text!r}: expected positive integers separated by "
                         "commas, e.g. 1,28,28 or 5")
    return dims


def _check_options(args: argparse.Namespace) -> torch.device:
    """Every check of ``rj jacobian``'s options that needs no model, run before anything is
    loaded or computed: the device, the alpha-CROWN settings, the output file.  Returns the
    device."""
    from rj_plugin.config import parse_device
    from rj_plugin.io.results import check_output_file

    try:
        device = parse_device(args.device)
    except ValueError as exc:
        raise InputError(f"--device: {exc}") from None
    if args.alpha_iterations < 1:
        raise InputError(f"--alpha-iterations must be an integer >= 1, got "
                         f"{args.alpha_iterations}")
    if not (math.isfinite(args.alpha_lr) and args.alpha_lr > 0):
        raise InputError(f"--alpha-lr must be a finite number > 0, got {args.alpha_lr}")
    if args.output:
        problem = check_output_file(args.output)
        if problem is not None:
            raise InputError(f"--output {args.output}: cannot write the results: {problem}")
    return device


def _load_bounder(args: argparse.Namespace, dtype: torch.dtype,
                  device: torch.device) -> JacobianBounder:
    """The :class:`~rj_plugin.api.JacobianBounder` of ``--model``, with ``--input-shape`` when
    the model does not record its input shape (an error naming the option when neither)."""
    from rj_plugin.api import JacobianBounder
    from rj_plugin.models import load_model

    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    model = load_model(args.model, dtype=dtype, device=device)
    recorded = getattr(model, "rj_input_shape", None)
    if shape is None and recorded is None:
        raise InputError(f"{args.model}: the model does not record its input shape; give "
                         "--input-shape (e.g. --input-shape 1,28,28 or --input-shape 5)")
    if shape is not None and recorded is not None and tuple(recorded) != shape:
        raise InputError(f"--input-shape {args.input_shape}: the model {args.model} takes "
                         f"{list(recorded)}, not {list(shape)}")
    return JacobianBounder(model, input_shape=shape or tuple(recorded), dtype=dtype,
                           device=device)


def _jacobian_command(args: argparse.Namespace) -> int:
    from rj_plugin.io.results import atomic_write_json, package_versions
    from rj_plugin.io.vnnlib import read_vnnlib

    dtype = DTYPES[args.dtype]
    device = _check_options(args)
    bounder = _load_bounder(args, dtype, device)
    shape = bounder.input_shape
    if args.vnnlib:
        spec = read_vnnlib(args.vnnlib)
        if spec.n_inputs != math.prod(shape):
            raise InputError(f"{args.vnnlib} declares {spec.n_inputs} inputs; the model takes "
                             f"{math.prod(shape)}")
        lower = np.stack([b[0] for b in spec.input_boxes]).reshape(-1, *shape)
        upper = np.stack([b[1] for b in spec.input_boxes]).reshape(-1, *shape)
        region = bounder.region(lower=lower, upper=upper)
    elif args.lower or args.upper:
        if not (args.lower and args.upper):
            raise InputError("--lower and --upper go together")
        region = bounder.region(lower=_load_array(args.lower, "lower"),
                                upper=_load_array(args.upper, "upper"))
    else:
        if args.center is None:
            raise InputError("give --center with --eps, a box (--lower/--upper), or --vnnlib")
        center = _load_array(args.center, "center")
        if center.size == math.prod(shape) and center.shape != shape:
            center = center.reshape(shape)
        region = bounder.region(center, args.eps, args.norm, unbounded=args.global_bounds)
    C = _load_array(args.spec, "spec") if args.spec else None
    jb = bounder.bound(region, preact=args.preact, method=args.method, C=C,
                       alpha_iterations=args.alpha_iterations, alpha_lr=args.alpha_lr)
    lip = jb.lipschitz()
    result = {
        "model": str(args.model),
        "input_shape": list(shape),
        "region": region.describe(),
        "options": {"preact": args.preact, "method": args.method, "dtype": args.dtype,
                    "device": args.device, "norm": args.norm, "eps": args.eps,
                    "alpha_iterations": args.alpha_iterations, "alpha_lr": args.alpha_lr,
                    "spec": args.spec, "global": args.global_bounds},
        "rows": jb.n_out,
        "lower": jb.lower.tolist(),
        "upper": jb.upper.tolist(),
        "lipschitz": {"dual_norm": "1" if math.isinf(region.norm) else
                      ("inf" if region.norm == 1 else "2"), "per_row": lip.tolist(),
                      "induced": jb.induced_norm().tolist()},
        "timings": {"build_s": bounder.build_seconds, **jb.timings},
        "versions": package_versions(),
    }
    if args.output:
        atomic_write_json(args.output, result)
    for b in range(jb.batch):
        width = (jb.upper[b] - jb.lower[b]).mean().item()
        vals = ", ".join(f"{v:.4g}" for v in lip[b].tolist())
        print(f"input {b}: mean bound width {width:.4g}; Lipschitz per row: {vals}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from rj_plugin.demo import run_demo

    overrides = list(args.overrides or [])
    if args.images is not None:
        overrides.append(f"data.end={args.images}")
    if args.eps is not None:
        overrides.append(f"specification.eps={args.eps}")
    return run_demo(overrides)


def _run_command(args: argparse.Namespace) -> int:
    from rj_plugin.config import load_config
    from rj_plugin.tasks.runner import run

    code, _ = run(load_config(args.config, args.overrides))
    return code


def _verify_command(args: argparse.Namespace) -> int:
    from rj_plugin.config import load_vnncomp_config
    from rj_plugin.verify.runner import run_verify

    config = load_vnncomp_config(args.config, args.overrides)
    record = run_verify(args.model, args.vnnlib, args.timeout, config=config,
                        results_file=args.results, json_file=args.json, verifier=args.verifier,
                        clock_start=args.clock_start, category=args.category, hard_exit=True)
    if record["answer"] == "error":
        details = record.get("details") or {}
        reason = details.get("error") or details.get("reason") or "the verifier failed"
        print(f"rj: error: {' '.join(str(reason).split())}", file=sys.stderr)
        return 1
    return 0


def _vnncomp_command(args: argparse.Namespace) -> int:
    from rj_plugin.verify.runner import run_vnncomp

    run_vnncomp(args.bench_dirs, output=args.output, config=args.config,
                overrides=args.overrides, timeout_scale=args.timeout_scale, jobs=args.jobs,
                executor=args.executor, address=args.address, limit=args.limit,
                verifier=args.verifier, progress=False if args.no_progress else None,
                label=args.label, compare=args.compare, cpus_per_task=args.cpus_per_task)
    return 0


def _score_command(args: argparse.Namespace) -> int:
    from rj_plugin.io.results import check_output_file
    from rj_plugin.verify.score import format_table, score_results, write_report

    base = Path(args.results).parent
    csv_out = args.csv or str(base / "score.csv")
    json_out = args.json or str(base / "score.json")
    for path, opt in ((csv_out, "--csv"), (json_out, "--json")):
        problem = check_output_file(path)
        if problem is not None:
            raise InputError(f"{opt} {path}: cannot write it: {problem}")
    report = score_results(args.results, args.bench_dirs, results_dir=args.results_dir,
                           bad_witness=args.bad_witness)
    write_report(report, csv_out, json_out)
    print(format_table(report), end="")
    for line in report.unmatched:
        print(f"not scored: {line}")
    print(f"total points: {report.total_points}")
    print(f"wrote {csv_out} and {json_out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rj", description="Certified Jacobian bounds (RecurJac)"
                                     " on auto_LiRPA's graph.")
    sub = parser.add_subparsers(dest="command", required=True)
    jac = sub.add_parser("jacobian", help="bound the Jacobian of a model over an input region")
    jac.add_argument("--model", required=True, help=".onnx, .pt, or a demo name (digits-relu)")
    jac.add_argument("--center", help="x0 as .npy/.txt/.csv ([*input_shape] or a batch)")
    jac.add_argument("--eps", type=float, help="radius of the l_p ball")
    jac.add_argument("--norm", default="inf", choices=["1", "2", "inf"])
    jac.add_argument("--lower", help="box lower corner (.npy/.txt/.csv)")
    jac.add_argument("--upper", help="box upper corner (.npy/.txt/.csv)")
    jac.add_argument("--vnnlib", help="take the input box(es) from a VNN-LIB file")
    jac.add_argument("--global", dest="global_bounds", action="store_true",
                     help="bound over the whole input space (center gives the shape)")
    jac.add_argument("--spec", help="a matrix C (.npy) to bound the Jacobian of C f(x)")
    jac.add_argument("--preact", default="crown",
                     choices=["ibp", "crown", "crown-ibp", "alpha-crown"])
    jac.add_argument("--method", default="recurjac",
                     choices=["recurjac", "linear", "fastlip", "interval"])
    jac.add_argument("--input-shape", default=None, metavar="D1,D2,...",
                     help="shape of one input, e.g. 1,28,28 or 5 (for .pt models that do not "
                     "record it)")
    jac.add_argument("--alpha-iterations", type=int, default=20,
                     help="alpha-CROWN iterations (>= 1)")
    jac.add_argument("--alpha-lr", type=float, default=0.1,
                     help="alpha-CROWN learning rate (finite, > 0)")
    jac.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    jac.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    jac.add_argument("--output", help="write the results as JSON here")
    jac.set_defaults(func=_jacobian_command)
    run = sub.add_parser("run", help="run one task of a YAML configuration (configs/README.md); "
                         "exit status 1 when some input failed")
    run.add_argument("config", help="the configuration file, e.g. configs/demo.yaml")
    run.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a key (value read as YAML)")
    run.set_defaults(func=_run_command)
    demo = sub.add_parser("demo", help="robustness and Lipschitz bounds on the bundled digits "
                          "MLP (runs configs/demo.yaml)")
    demo.add_argument("--images", type=int, default=None, help="test images (data.end)")
    demo.add_argument("--eps", type=float, default=None,
                      help="first radius of the searches (specification.eps)")
    demo.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                      metavar="SECTION.KEY=VALUE", help="override a key of the demo config")
    demo.set_defaults(func=_demo_command)
    ver = sub.add_parser("verify", help="verify one VNN-COMP instance; prints answer, seconds "
                         "and deciding stage; exit 0 unless the answer is error")
    ver.add_argument("--model", required=True, help="the ONNX network")
    ver.add_argument("--vnnlib", required=True, help="the VNN-LIB property")
    ver.add_argument("--timeout", type=float, default=60.0,
                     help="wall-clock budget in seconds, start-up included (default 60)")
    ver.add_argument("--config", default=None,
                     help="verifier configuration (configs/vnncomp/*.yaml; default: defaults)")
    ver.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a configuration key")
    ver.add_argument("--results", default=None,
                     help="write the VNN-COMP result file here (answer, witness after sat)")
    ver.add_argument("--json", default=None, help="write the verdict's record (JSON) here")
    ver.add_argument("--category", default=None, help="benchmark name recorded in the JSON")
    ver.add_argument("--clock-start", type=float, default=None, help=argparse.SUPPRESS)
    ver.add_argument("--verifier", default=None, help=argparse.SUPPRESS)
    ver.set_defaults(func=_verify_command)
    vnn = sub.add_parser("vnncomp", help="run every instance of VNN-COMP benchmark folders, each "
                         "in its own process under its timeout")
    vnn.add_argument("bench_dirs", nargs="+", metavar="BENCH_DIR",
                     help="folders with instances.csv (onnx,vnnlib,timeout)")
    vnn.add_argument("--output", default=None, metavar="DIR",
                     help="results folder (default: general.results_dir of the configuration)")
    vnn.add_argument("--config", default=None, help="one configuration for every benchmark "
                     "(default: configs/vnncomp/<benchmark>.yaml when it exists)")
    vnn.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a configuration key")
    vnn.add_argument("--timeout-scale", type=float, default=1.0, metavar="X",
                     help="multiply every instance's timeout by X")
    vnn.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="serial executor: instances run at the same time")
    vnn.add_argument("--executor", choices=["serial", "ray"], default="serial")
    vnn.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    vnn.add_argument("--cpus-per-task", type=float, default=1.0,
                     help="Ray CPUs (and threads) per instance")
    vnn.add_argument("--limit", type=int, default=None, metavar="N",
                     help="only the first N instances of each folder")
    vnn.add_argument("--label", default=None, help="this configuration's name in the cactus plot")
    vnn.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                     help="earlier output folders drawn in the cactus plot too")
    vnn.add_argument("--no-progress", action="store_true", help="no progress bar")
    vnn.add_argument("--verifier", default=None, help=argparse.SUPPRESS)
    vnn.set_defaults(func=_vnncomp_command)
    sco = sub.add_parser("score", help="score a results.csv: +10 right, -150 wrong (witness and "
                         "consensus references only; sat needs a witness that re-checks)")
    sco.add_argument("results", metavar="RESULTS.csv", help="competition results.csv")
    sco.add_argument("bench_dirs", nargs="+", metavar="BENCH_DIR",
                     help="benchmark folders (instances.csv, known_results.csv)")
    sco.add_argument("--results-dir", default=None, help="where the per-instance result files "
                     "are (default: the folder of RESULTS.csv)")
    sco.add_argument("--bad-witness", choices=["wrong", "unknown"], default="wrong",
                     help="what a sat without a valid witness scores (default wrong: -150)")
    sco.add_argument("--csv", default=None, help="per-instance scores (default: score.csv next "
                     "to RESULTS.csv)")
    sco.add_argument("--json", default=None, help="the report (default: score.json next to "
                     "RESULTS.csv)")
    sco.set_defaults(func=_score_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except RJError as exc:
        print(f"rj: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rj: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "verbose", False):
        print(f"done in {time.perf_counter() - start:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
