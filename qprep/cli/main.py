"""The ``qprep`` command line (also ``python -m qprep``).

Subcommands: ``prepare``, ``diff``, ``verify``, ``check`` and ``demo``; ``qprep -h`` and
``qprep COMMAND -h`` show their options. Exit codes: see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import warnings

import torch

from ..api import diff, verify
from ..core.errors import InputError, QprepError, TraceError
from ..core.inputs import with_concrete
from ..core.paths import check_writable
from ..examples import EXAMPLES
from ..report import jsonable, report_format
from ..verify import run_trials, trials_table
from .check import cmd_check
from .files import load_prepared, needs_trust, save_prepared, trust_flag, trusted_objects, warn_pickle
from .inputs import UsageError, load_model, need_inputs, parse_int_range, setup
from .run import equal, prepared_unchecked, prepared_with_verdict

__all__ = ["main", "build_parser", "load_model", "EXIT_CODES"]

#: Exit status -> meaning.
EXIT_CODES = {
    0: "equivalent (prepare, diff, verify, demo) / ready for module-level quantization (check)",
    1: "not equivalent / not ready (check found ops a module-level quantizer would miss), or a pass failed",
    2: "usage or model-loading error: bad arguments or model spec, import error, bad JSON, "
       "inputs the model rejects (more than forward takes, empty tensors), an output path that cannot be "
       "written, a model file that does not load (untrusted names: --trust; a torch.save file: --pickle), "
       "a model that cannot be traced",
    3: "internal error in qprep (rerun with --debug for the traceback)",
}

_EPILOG = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items()) + """

MODEL is 'package.module:attr' or 'path/to/file.py:attr'; attr is an nn.Module class, an
instance or a factory function (constructor/factory kwargs: --kwargs JSON). The model is
built after torch.manual_seed(--seed), so separate runs build the same weights."""


# -- commands ----------------------------------------------------------------------------------
def _report_path(path: str | None, what: str) -> None:
    """A report path checked before any work: known suffix, writable folder."""
    if path:
        report_format(path)
        check_writable(path, what)


def cmd_prepare(args) -> int:
    out = check_writable(args.output, "-o")
    _report_path(args.report, "--report")
    if args.pickle:
        warn_pickle("prepare")
    model, inputs, options = setup(args)
    inputs = need_inputs(inputs, "prepare")
    gm = prepared_with_verdict(model, inputs, options)
    report = diff(model, gm)
    reloaded = save_prepared(gm, out, pickle=args.pickle)
    call = with_concrete(model, inputs, options.get("concrete_args"))
    reload_ok = verify(model, reloaded, call, replay=False).equal
    print(report.text())
    if args.report:
        print(f"report written to {report.write(args.report)}")
    if args.pickle:
        how = "torch.load(path, weights_only=False), only if you trust the file"
    else:
        trust = needs_trust(gm)
        how = "qprep.serialize.load(path" + (f", trusted=[{', '.join(t.__qualname__ for t in trust)}]" if trust
                                             else "") + ")"
        if trust:
            how += "; qprep verify --prepared: " + " ".join(trust_flag(t) for t in trust)
    print(f"prepared model saved to {out} (load it with {how}; "
          f"the reloaded model computes the same: {'yes' if reload_ok else 'NO'})")
    return 0 if equal(gm) and reload_ok else 1


def cmd_diff(args) -> int:
    if args.output:
        if not args.format:
            report_format(args.output)
        check_writable(args.output, "-o")
    model, inputs, options = setup(args)
    gm = prepared_with_verdict(model, inputs, options)
    report = diff(model, gm)
    if args.output and not args.format:
        report.write(args.output)
    else:
        render = {"text": report.text, "markdown": report.markdown, "json": report.json, "html": report.html}
        text = render[args.format or "text"]()
        if args.output:
            pathlib.Path(args.output).write_text(text + "\n", encoding="utf-8")
        else:
            print(text)
    return 0 if equal(gm) else 1


def cmd_verify(args) -> int:
    if (args.trust or args.pickle) and not args.prepared:
        raise UsageError("--trust and --pickle apply to a --prepared file")
    if args.trust and args.pickle:
        raise UsageError("--trust and --pickle exclude each other (--pickle trusts everything the file names)")
    trusted = trusted_objects(args.trust)
    if args.pickle:
        warn_pickle("verify")
    model, inputs, options = setup(args)
    inputs = need_inputs(inputs, "verify")
    if args.prepared:
        prepared = load_prepared(args.prepared, pickle=args.pickle, trusted=trusted)
    else:
        prepared = prepared_unchecked(model, inputs, options)
    inputs = with_concrete(model, inputs, options.get("concrete_args"))
    show = args.trials > 1 or sys.stderr.isatty()

    def progress(i: int, n: int, mode: str) -> None:
        if show:
            print(f"trial {i}/{n} ({mode})", file=sys.stderr, flush=True)

    try:
        runs = run_trials(model, prepared, inputs, trials=args.trials, train=args.train, grad=args.grad,
                          seed=args.seed, int_range=parse_int_range(args), progress=progress, check=verify)
    except QprepError:
        raise
    except Exception as exc:  # noqa: BLE001  (a prepared model that cannot even run is not equivalent)
        print(f"qprep: the models cannot be compared on these inputs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ok = all(r.equal for r in runs)
    if args.json:
        print(json.dumps(jsonable({"schema": "qprep.verify/1", "equal": ok, "runs": [r.as_dict() for r in runs]}),
                         indent=2, allow_nan=False))
    else:
        print(trials_table(runs))
    return 0 if ok else 1


def cmd_demo(args) -> int:
    chosen = [e for e in EXAMPLES if not args.example or e.name in args.example]
    unknown = set(args.example or ()) - {e.name for e in EXAMPLES}
    if unknown:
        raise UsageError(f"unknown example(s) {sorted(unknown)}; choose from {[e.name for e in EXAMPLES]}")
    outdir = pathlib.Path(args.output_dir) if args.output_dir else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    status = 0
    for example in chosen:
        print(f"=== {example.name}: {example.description} ===\n")
        try:
            torch.manual_seed(args.seed)
            model = example.build().eval()
            inputs = model.example_inputs()
            gm = prepared_with_verdict(model, inputs, {})
            report = diff(model, gm)
            print(report.text())
            print("\nverdict on more inputs, eval and train mode (dropout draws the same masks in both):")
            runs = run_trials(model, gm, inputs, trials=args.trials, train=True, seed=args.seed, check=verify)
            print(trials_table(runs))
            if outdir:
                print(f"report written to {report.write(outdir / f'{example.name}.html')}")
            if not (equal(gm) and all(r.equal for r in runs)):
                status = 1
        except (ImportError, QprepError) as exc:
            print(f"example {example.name} could not run: {type(exc).__name__}: {_one_line(exc)}")
            status = 1
        print()
    return status


# -- parser and main ---------------------------------------------------------------------------
def _model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", metavar="MODEL", help="'package.module:attr' or 'path/to/file.py:attr'")
    p.add_argument("--kwargs", metavar="JSON", help="constructor/factory keyword arguments, a JSON object")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="shape of one positional input, e.g. 1,3,224,224 (repeat for each input)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="float32 (default), int64, bool, ...: one for all inputs or one per --input-shape")
    p.add_argument("--int-range", metavar="LOW,HIGH", help="range of random integer inputs, HIGH exclusive (default 0,2)")
    p.add_argument("--inputs", metavar="FILE", help="example inputs: a tensor or tuple saved with torch.save")
    p.add_argument("--concrete", action="append", metavar="NAME=VALUE",
                   help="fix a forward argument at trace time, VALUE in JSON: mask=null, scale=2.0 (repeatable); "
                        "verification passes the same value to both models")
    p.add_argument("--leaf", action="append", metavar="NAME",
                   help="keep a submodule opaque: a qualified name (encoder.block3) or a class (pkg.mod:Class)")
    p.add_argument("--on-untraceable", choices=("raise", "leaf"), default="raise",
                   help="'leaf' keeps untraceable submodules opaque instead of failing")
    p.add_argument("--seed", type=int, default=0, help="seed for building the model and random inputs (default 0)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="qprep", description="Make PyTorch models ready for module-level "
                                     "quantization, bit for bit.", epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model = _model_parent()

    p = sub.add_parser("prepare", parents=[model], help="prepare, verify and save a model", epilog=_EPILOG,
                       formatter_class=fmt, description="Prepare MODEL, verify it bitwise on the inputs, save the "
                       "GraphModule (pickle-free, qprep.serialize) and print the report.")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to save the prepared model (qprep.serialize format; .qprep suggested)")
    p.add_argument("--pickle", action="store_true",
                   help="save with torch.save instead: loading that file runs code it names (trusted files only)")
    p.add_argument("--report", metavar="FILE", help="also write the report (.html, .md, .json or .txt)")
    p.add_argument("--train", action="store_true", help="prepare the model in train mode (default: eval mode)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("diff", parents=[model], help="print or write the report only", epilog=_EPILOG,
                       formatter_class=fmt, description="Prepare MODEL and print (or write) what changed.")
    p.add_argument("--format", choices=("text", "markdown", "json", "html"),
                   help="default: text, or the -o file's suffix")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of printing")
    p.add_argument("--train", action="store_true", help="prepare the model in train mode (default: eval mode)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("verify", parents=[model], help="compare original and prepared on seeded random inputs",
                       epilog=_EPILOG, formatter_class=fmt, description="Run MODEL and its prepared version "
                       "(from --prepared, or prepared now) on N seeded inputs and print a verdict table.")
    p.add_argument("--prepared", metavar="FILE", help="a prepared model file (qprep prepare -o), loaded without "
                   "pickle (qprep.serialize.load)")
    p.add_argument("--trust", action="append", metavar="MOD:NAME",
                   help="a class or function (package.module:Name or file.py:Name) the --prepared file needs "
                        "beyond qprep's allowlist (repeatable)")
    p.add_argument("--pickle", action="store_true",
                   help="the --prepared file was written by torch.save: load it with torch.load(weights_only=False), "
                        "which runs code the file names (trusted files only)")
    p.add_argument("--trials", type=int, default=1, metavar="N", help="number of inputs (default 1)")
    p.add_argument("--train", action="store_true", help="also compare in train mode, dropout masks matched")
    p.add_argument("--grad", action="store_true", help="also compare gradients")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check", parents=[model], help="readiness lint for a model not yet prepared",
                       epilog=_EPILOG, formatter_class=fmt, description="List every tensor op, functional call, "
                       "re-used module and recurrent/attention module that a module-level quantizer would miss, "
                       "with its source line and the fix.")
    p.add_argument("--format", choices=("text", "github", "json"), default="text",
                   help="github: ::warning annotations for GitHub Actions")
    p.add_argument("--train", action="store_true", help="check the model in train mode (default: eval mode)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="run the built-in examples (Distiller block, LSTM language model)",
                       epilog=_EPILOG, formatter_class=fmt)
    p.add_argument("--example", action="append", metavar="NAME", help="run only this example (distiller, lstm)")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="also write an HTML report per example into DIR")
    p.add_argument("--trials", type=int, default=2, metavar="N", help="inputs to verify each example on (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see :data:`EXIT_CODES`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
    try:
        return args.func(args)
    except (UsageError, InputError, TraceError) as exc:
        if args.debug:
            raise
        print(f"qprep {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except QprepError as exc:
        if args.debug:
            raise
        print(f"qprep {args.command}: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`: stop quietly, as SIGPIPE would
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
        return 141
    except Exception as exc:  # noqa: BLE001  (a bug: short message unless --debug)
        if args.debug:
            raise
        print(f"qprep {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 3
