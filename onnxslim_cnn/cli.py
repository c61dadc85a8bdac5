"""Command line: ``onnxslim IN.onnx OUT.onnx [--passes slim,...] [--set pass.option=value] ...``.

Installed twice, as ``onnxslim`` and as ``onnxslim-cnn`` (the latter never clashes with the
unrelated OnnxSlim package, which also installs an ``onnxslim`` command).

Exit codes: 0 success; 2 bad input (one line on stderr, no output written); 3 the run did not
do what was asked (a pass failed or was reverted: the reasons on stderr, even with -q, and no
output model unless --keep-anyway; --allow-skip accepts it and exits 0); 1 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from .errors import UserError
from .progress import Progress

PROG = "onnxslim"
EXIT_INCOMPLETE = 3  # the run did not do all it was asked to (see the module docstring)

# Subcommands other than "run passes on IN.onnx": name -> ("module", "function"); the function
# takes the remaining argv and returns the exit code (UserError -> exit 2 as everywhere).
# Imported only when used, so `onnxslim IN OUT` never pays for them. A model file that is
# literally named like a subcommand can still be given as ./pack.
SUBCOMMANDS: "dict[str, tuple[str, str]]" = {
    "fpga": ("onnxslim_cnn.fpga_cli", "main"),
    "pack": ("onnxslim_cnn.pack_cli", "pack_main"),
    "unpack": ("onnxslim_cnn.pack_cli", "unpack_main"),
    "bench": ("onnxslim_cnn.runtime.cli_bench", "main"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "None":  # one line, exit 2, like every other bad input
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Make a trained CNN in ONNX smaller and faster: run passes, check, report.",
        epilog="Examples:\n  onnxslim model.onnx out.onnx\n"
               "  onnxslim model.onnx out.onnx --passes slim --report report.json --bench\n"
               "  onnxslim --list-passes\n\n"
               "Other commands (each with --help):\n"
               "  onnxslim pack IN.onnx OUT.onnxz      Deep Compression container (Huffman-coded weights)\n"
               "  onnxslim unpack IN.onnxz OUT.onnx    restore the packed model, byte for byte\n"
               "  onnxslim fpga IN.onnx OUTDIR         fixed-point IR, C++17 and hls4ml config\n"
               "  onnxslim bench IN.onnx               ORT CPU latency (--sparse-ep: with the sparse runtime)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", nargs="?", help="input ONNX model (never modified)")
    p.add_argument("output", nargs="?", help="output ONNX model (written atomically)")
    p.add_argument("--passes", help="comma-separated passes to run in order (default: slim)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PASS.OPTION=VALUE",
                   help="set a pass option, e.g. --set slim.cse=false (repeatable)")
    p.add_argument("--recipe", help="YAML or JSON file with 'passes' and 'options'")
    p.add_argument("--calib", metavar="FILE.npz|DIR|random",
                   help="calibration data: an .npz with one array per model input (axis 0 = samples), a folder "
                        "of images (jpg/png/bmp, recursive; needs --preprocess), or 'random' (the documented "
                        "generator: accepts unverified output of lossy passes). Lossy passes refuse to run without it")
    p.add_argument("--preprocess", metavar="PRESET[,KEY=VALUE,...]",
                   help="how --calib DIR images become inputs: a preset (imagenet, unit, symmetric, paddleocr_rec, "
                        "paddleocr_det) and overrides, e.g. imagenet,layout=nhwc,size=224x224 (docs/calibration.md)")
    p.add_argument("--heldout", type=float, metavar="FRACTION",
                   help="share of the calibration samples no pass fits on, for the report's fidelity "
                        "(default 0.25, at least 8 when there are 16 or more samples; 0 = none; at most 0.5)")
    p.add_argument("--budget", metavar="cosine=C,top1=T[,rel_error=E][,faster=on|off]|off",
                   help="accuracy budget the lossy passes share, checked on the held-out samples: least output "
                        "cosine, least top-1 agreement (classifier outputs), largest relative error (default "
                        "cosine=0.99,top1=0.99; 'off' runs the passes exactly as configured). Missed: exit 3. "
                        "faster=on (default): prune/svd/lowrank/q8 cuts that make the model slower at batch 1 "
                        "are left out (timed, so near-ties can differ between runs; faster=off: same bytes)")
    p.add_argument("--input-shape", dest="input_shapes", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete shape for an input with dynamic dims (for random calibration and MACs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random calibration generator (default 0)")
    p.add_argument("--report", metavar="FILE.json|FILE.html",
                   help="also write the report to this file: JSON, or a self-contained HTML page (charts, "
                        "per-layer table; no network needed to view) when the name ends in .html or .htm")
    p.add_argument("--bench", action="store_true", help="measure ORT CPU latency before/after (1 thread)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the ORT comparison with the original")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output and no report table")
    p.add_argument("--keep-anyway", action="store_true",
                   help="write the output model even when a pass failed or was reverted (still exit 3)")
    p.add_argument("--allow-skip", action="store_true",
                   help="best effort: a pass that failed or was reverted is a warning, not exit 3")
    p.add_argument("--list-passes", action="store_true", help="list the passes and their options, then exit")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def format_pass_list() -> str:
    from .options import describe
    from .pass_infra import available_passes

    lines = []
    for name, cls in sorted(available_passes().items()):
        lines.append(f"{name}")
        lines.extend(textwrap.wrap(cls.summary, 88, initial_indent="    ", subsequent_indent="    "))
        for opt in describe(cls.Options):
            choices = f" (one of {', '.join(map(str, opt['choices']))})" if opt["choices"] else ""
            lines.append(f"    --set {name}.{opt['name']}=<{opt['type']}>  default {opt['default']!r}{choices}")
            lines.extend(textwrap.wrap(opt["help"], 84, initial_indent="        ", subsequent_indent="        "))
        lines.append("")
    return "\n".join(lines)


class _Progress(Progress):
    """The run's progress on stderr (onnxslim_cnn/progress.py): ``mode="auto"`` draws a bar on a
    terminal and writes bounded-rate lines with an ETA anywhere else (CI, notebooks); off with -q."""

    def __init__(self, enabled: bool, mode: str = "bar"):
        super().__init__(mode if enabled else "off")


def run(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module, function = SUBCOMMANDS[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = build_parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(f"onnxslim-cnn {__version__}")
        return 0
    if args.list_passes:
        print(format_pass_list())
        return 0
    if not args.input or not args.output:
        raise UserError("need an input and an output model: onnxslim IN.onnx OUT.onnx (see --help)")

    from .analysis.calibration import parse_input_shapes
    from .files import check_outputs
    from .options import load_recipe, parse_set
    from .pipeline import run_pipeline

    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise UserError(f"output {dst} is the input model; choose another output path")
    check_outputs({"output": dst, "--report": args.report}, inputs=(src, args.recipe, args.calib))
    passes, options = load_recipe(args.recipe) if args.recipe else ([], {})
    if args.passes is not None:
        passes = [p.strip() for p in args.passes.split(",") if p.strip()]
        if not passes:
            raise UserError("--passes is empty")
    for pass_name, opts in parse_set(args.sets).items():
        options.setdefault(pass_name, {}).update(opts)
    progress = _Progress(enabled=not args.quiet, mode="auto")
    result = run_pipeline(src, passes or None, options=options, calib=args.calib,
                          input_shapes=parse_input_shapes(args.input_shapes), seed=args.seed,
                          fidelity=not args.no_fidelity, bench=args.bench, progress=progress,
                          **_calibration_args(args))
    progress.close()
    report = result.report
    problems = report.problems
    incomplete = bool(problems) and not args.allow_skip
    if not args.quiet:
        print(report.format_table())
    for line in problems:
        print(f"{PROG}: {'warning' if args.allow_skip else 'error'}: {line}", file=sys.stderr)
    write_model = not incomplete or args.keep_anyway
    _write_outputs(result.model if write_model else None, dst, report, args.report)
    if incomplete:
        kept = f"wrote {dst} anyway (--keep-anyway)" if write_model else f"{dst} not written (--keep-anyway writes it)"
        print(f"{PROG}: error: the run did not do all that was asked; {kept}; --allow-skip accepts skipped "
              "passes", file=sys.stderr)
        return EXIT_INCOMPLETE
    if not args.quiet:
        print(f"\nwrote {dst}")
    return 0


def _calibration_args(args: argparse.Namespace) -> dict:
    """--preprocess, --heldout and --budget, each over the recipe's ``calibration`` block."""
    from .options import recipe_calibration

    out = recipe_calibration(args.recipe) if args.recipe else {}
    if args.preprocess is not None:
        out["preprocess"] = args.preprocess
    if args.heldout is not None:
        out["heldout"] = args.heldout
    if args.budget is not None:
        out["budget"] = args.budget
    return out


def _write_outputs(model, dst: Path, report, report_path: "str | None") -> None:
    """The report (if asked) and then the model (if given): a report that cannot be written
    leaves no model behind, and a model that cannot be written takes its report back."""
    from .files import write_atomic
    from .model_io import save_model

    report_written = False
    if report_path:
        existed = Path(report_path).exists()
        html = Path(report_path).suffix.lower() in (".html", ".htm")
        write_atomic(report_path, (report.to_html() if html else report.to_json()).encode("utf-8"))
        report_written = not existed
    if model is None:
        return
    try:
        save_model(model, dst)
    except BaseException:
        if report_written:
            Path(report_path).unlink(missing_ok=True)
        raise


def _interrupt_promptly() -> None:
    """Make SIGINT act within a second even while the main thread is inside ONNX Runtime or
    numpy: Python runs signal handlers only between bytecodes in the main thread, and one ORT
    calibration run of a detector took 18.9 s to notice Ctrl-C. Python's C-level handler writes
    the signal number to a wakeup fd at once, in whatever thread the kernel picked (an OpenBLAS
    worker, often); a waiting thread reads it, removes what the run has in flight (its temp
    folder, staged outputs) and exits 130 (measured on ppocrv4_det q8 at 640x640, SIGINT 1.5-9 s
    in: 0.02-0.5 s). Only for the real command line: in-process callers
    (tests, notebooks) keep their handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return  # started with SIGINT ignored (a background job of a script): keep it so
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    # The main thread does nothing on SIGINT (no KeyboardInterrupt half-way through a cleanup);
    # a Python handler is still needed for the C handler to write the wakeup fd.
    signal.signal(signal.SIGINT, lambda signum, frame: None)

    def wait() -> None:
        from . import workdir

        while os.read(read_end, 1) != bytes([signal.SIGINT]):
            pass
        workdir.remove_all()
        sys.stderr.write(f"{PROG}: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    threading.Thread(target=wait, name="onnxslim-sigint", daemon=True).start()


def main(argv: "list[str] | None" = None) -> int:
    from . import workdir

    if argv is None:
        _interrupt_promptly()
    try:
        with workdir.run_folder():
            return run(argv)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line, traceback only on request
        if os.environ.get("ONNXSLIM_CNN_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"{PROG}: internal error: {type(exc).__name__}: {first} "
              "(set ONNXSLIM_CNN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
