"""Command line: `onnxrep optimize | rules | demo | bench`.

Exit codes (see onnxrep.errors): 0 ok, 1 internal error, 2 usage, 3 bad input, 4 verification
failed, 5 cannot write output. Errors are one line on stderr; --debug adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from pathlib import Path

from . import __version__, units
from .errors import EXIT_INTERNAL, EXIT_USAGE, OnnxrepError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message):
        raise UsageError(message)


def _nonnegative(number: str, given: str, what: str) -> float:
    """`number` as a finite float >= 0, or the argparse error naming what `given` should have been."""
    try:
        v = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {given}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0: {given}")
    return v


def _tolerance(s: str) -> float:
    return _nonnegative(s, s, "a number")


def _byte_count(s: str) -> int:
    """'1073741824', '512M', '2G', '64KiB' → bytes (binary units)."""
    text = s.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    return int(_nonnegative(number, s, "a size in bytes (e.g. 1073741824, 512M, 2G)") * scale)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxrep", description="Structural re-parameterization of ONNX graphs.")
    p.add_argument("--version", action="version", version=f"onnxrep {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    o = sub.add_parser("optimize", help="rewrite a training-time graph into its inference form and verify it")
    o.add_argument("input", help="training-time ONNX model")
    o.add_argument("output", help="where to write the optimized model (written atomically)")
    _add_rewrite_flags(o)
    _add_verify_flags(o)
    o.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="write weights to a data file beside OUTPUT (OUTPUT.<token>.data): auto = when the input had external data or the model exceeds 1 GB")
    o.add_argument("--report", metavar="FILE.json", help="write the before/after report and per-rule counts as JSON")
    o.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    o.add_argument("--explain", action="store_true", help="list every rewrite and every declined match with its reason")
    o.set_defaults(func=cmd_optimize)

    r = sub.add_parser("rules", help="list the rewrite rules in the order they apply")
    r.add_argument("--markdown", action="store_true", help="print the README's rules table")
    r.set_defaults(func=cmd_rules)

    d = sub.add_parser("demo", help="optimize and verify the built-in training-time RepVGG model")
    d.add_argument("--out", metavar="FILE.onnx", help="also write the optimized demo model here")
    d.set_defaults(func=cmd_demo)

    try:
        from . import bench
    except ImportError:  # pragma: no cover - bench is part of the package
        bench = None
    if bench is not None and hasattr(bench, "add_parser"):
        bench.add_parser(sub)

    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", help="verbose log and tracebacks")
    return p


def _add_rewrite_flags(o):
    o.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="pin an input's shape (repeatable), e.g. input:1,3,224,224; folds shape arithmetic")
    o.add_argument("--rules", type=_csv, default=None, metavar="A,B", help="apply only these rules")
    o.add_argument("--skip", type=_csv, default=[], metavar="A,B", help="do not apply these rules")
    o.add_argument("--enable", type=_csv, default=[], metavar="A,B", help="also apply these opt-in rules")
    o.add_argument("--aggressive", action="store_true", help="merge even where the cost model expects a slower result")
    o.add_argument("--rm", action="store_true", help="remove residual connections of ReLU ResNet blocks (RMNet; adds MACs), same as --enable rm_residual")
    o.add_argument("--fuse-activations", action="store_true", help="write GELU, LayerNorm, HardSwish, Mish, ... patterns as the opset's standard op (Gelu needs opset 20, LayerNormalization 17), same as --enable fuse_activations")
    o.add_argument("--freeze-inputs", action="store_true",
                   help="treat initializers that are also graph inputs (defaults a caller may override) as constants "
                        "and drop them from the inputs; changes the model's signature")
    o.add_argument("--fold-limit", type=_byte_count, default=None, metavar="BYTES",
                   help="largest tensor constant folding may create (default 1G, ONNX Runtime's own; e.g. 4G)")


def _add_verify_flags(o):
    """Verification flags; their defaults are verify.VerifyOptions' (None here: not given)."""
    from .verify import VerifyOptions

    d = VerifyOptions()
    o.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime equivalence check")
    o.add_argument("--rtol", type=_tolerance, default=None,
                   help="relative tolerance, of each output's max |value| (default by the model's precision: 1e-5 fp32, 2e-3 fp16)")
    o.add_argument("--atol", type=_tolerance, default=None, help=f"absolute tolerance added to the relative one (default {d.atol:g})")
    o.add_argument("--seed", type=int, default=None, help=f"seed for the random verification inputs (default {d.seed})")
    o.add_argument("--no-deployed-check", action="store_true",
                   help="skip the second run of the output at ONNX Runtime's default optimization level "
                        "(it costs a third ORT session and a copy of the conv weights)")


def cmd_rules(args) -> int:
    from .engine import all_rules

    rules = all_rules()
    if args.markdown:
        print(rules_markdown(rules))
        return 0
    width = max(len(r.name) for r in rules)
    for r in rules:
        flag = "" if r.default else "  [opt-in]"
        print(f"{r.name:<{width}}  {r.description}{flag}")
    return 0


def rules_markdown(rules) -> str:
    """The rules table of README.md, generated from the registry (tests/test_readme.py compares)."""
    rows = ["| rule | what it does |", "|---|---|"]
    for r in rules:
        name = f"`{r.name}`" + ("" if r.default else " (opt-in)")
        rows.append(f"| {name} | {r.description} |")
    return "\n".join(rows)


def cmd_optimize(args) -> int:
    from .optimizer import optimize_file
    from .shapes import parse_specs
    from .verify import VerifyOptions

    parse_specs(args.input_shape)  # usage errors before any file is touched
    report = optimize_file(  # checks the output and report paths before it reads anything
        args.input, args.output, external_data={"yes": True, "no": False, "auto": "auto"}[args.external_data],
        rules=args.rules, skip=args.skip, enable=args.enable + (["rm_residual"] if args.rm else []) + (["fuse_activations"] if args.fuse_activations else []), input_shapes=args.input_shape,
        verify=not args.no_verify, rtol=args.rtol, atol=args.atol, aggressive=args.aggressive, seed=args.seed,
        verify_options=VerifyOptions(deployed=not args.no_deployed_check),
        freeze_inputs=args.freeze_inputs, fold_limit=args.fold_limit,
        also_writes=(args.report,) if args.report else (),
    )
    report.input = args.input
    if args.report:
        _write_json(args.report, report.to_dict())
    if not args.quiet:
        print(format_report(report, explain=args.explain))
        print(f"wrote {', '.join(report.written)}")
    return 0


def cmd_demo(args) -> int:
    from importlib import resources

    from .io import check_output_path, load_model
    from .optimizer import optimize, optimize_file

    if args.out:
        check_output_path(None, args.out)
    with resources.as_file(resources.files("onnxrep") / "data" / "demo.onnx") as path:
        print(f"demo: {path.name}, a training-time RepVGG network (3x3 + 1x1 + identity branches, BatchNorm)")
        if args.out:  # the optimize command's own path: streamed, verified as written
            report = optimize_file(path, args.out)
        else:
            info: dict = {}
            out, report = optimize(load_model(path, info=info), return_report=True)
            report.before["file_bytes"] = info.get("file_bytes")
            report.after["file_bytes"] = out.ByteSize()
    report.input = "demo.onnx"
    print(format_report(report))
    if args.out:
        print(f"wrote {', '.join(report.written)}")
    # the one-line result a new user (and CI's quick-start check) looks for
    print(f"demo: {report.before['nodes']} -> {report.after['nodes']} nodes, verified "
          f"(max relative error {report.verification['max_rel_error']:.1e})")
    return 0


def _write_json(path, data) -> None:
    from .files import write_text_atomic  # atomic, and as readable as the model beside it

    write_text_atomic(path, json.dumps(data, indent=2))


def format_report(report, explain: bool = False) -> str:
    b, a = report.before, report.after
    ops = sorted(set(b["ops"]) | set(a["ops"]), key=lambda k: (-b["ops"].get(k, 0), k))
    rows = [(op, str(b["ops"].get(op, 0)), str(a["ops"].get(op, 0))) for op in ops]
    rows += [
        ("nodes", str(b["nodes"]), str(a["nodes"])),
        ("parameters", units.count(b["parameters"]), units.count(a["parameters"])),
        ("MACs", units.count(b["macs"]), units.count(a["macs"])),
        ("size", units.nbytes(b.get("file_bytes")), units.nbytes(a.get("file_bytes"))),
    ]
    w0 = max(len(r[0]) for r in rows + [("", "", "")])
    w1 = max(len(r[1]) for r in rows + [("", "before", "")])
    w2 = max(len(r[2]) for r in rows + [("", "", "after")])
    line = f"+{'-' * (w0 + 2)}+{'-' * (w1 + 2)}+{'-' * (w2 + 2)}+"
    out = [line, f"| {'':<{w0}} | {'before':>{w1}} | {'after':>{w2}} |", line]
    for i, (k, x, y) in enumerate(rows):
        if i == len(ops):
            out.append(line)
        out.append(f"| {k:<{w0}} | {x:>{w1}} | {y:>{w2}} |")
    out.append(line)
    counts = ", ".join(f"{k} ×{v}" for k, v in report.rule_counts.items()) or "none"
    out.append(f"rules: {counts}")
    v = report.verification
    if v is None:
        out.append("verification: skipped (--no-verify)")
    else:
        shapes = ", ".join(f"{k}{tuple(s)}" for k, s in v["input_shapes"].items())
        out.append(f"verification: max relative error {v['max_rel_error']:.2e} on {shapes} (ONNX Runtime, optimizations off)")
        d = v.get("deployed")
        if d and d.get("note"):
            out.append(f"  as deployed (ONNX Runtime, default optimizations): not compared, {d['note']}")
        elif d:
            out.append(f"  as deployed (ONNX Runtime, default optimizations): max relative error {d['max_rel_error']:.2e}")
    verify_s = f" (verification {v['seconds']:.2f} s)" if v and v.get("seconds") is not None else ""
    out.append(f"time: {report.seconds:.2f} s{verify_s}")
    for n in report.notes:
        out.append(f"note: {n}")
    if explain:
        out.append("rewrites:")
        for r in report.rewrites:
            made = ", ".join(r["created"]) or "(removed)"
            out.append(f"  {r['rule']}: {', '.join(r['replaced'])} -> {made}  {r['detail']}".rstrip())
        if report.declines:
            out.append("declined:")
            for d in report.declines:
                out.append(f"  {d['rule']} at {d['node']}: {d['reason']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except OnnxrepError as e:
        if debug:
            traceback.print_exc()
        print(f"onnxrep: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxrep: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    except Exception as e:  # a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"onnxrep: internal error: {type(e).__name__}: {first} (re-run with --debug and report it)", file=sys.stderr)
        return EXIT_INTERNAL
