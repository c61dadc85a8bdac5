"""``onnxslim fpga IN.onnx OUTDIR``: run the ``fpga`` lowering and write what it produced.

The pass (``passes/fpga``) returns the fixed-point IR in memory; this command is the part that
parses arguments, writes files and prints, which a pass never does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .analysis.calibration import parse_input_shapes
from .cli import _Parser
from .errors import UserError
from .files import check_outputs, write_atomic_many
from .options import parse_set
from .passes.fpga import OUTPUT_NAMES, FpgaPass, format_table, lower_model, output_files


def main(argv: "list[str]") -> int:
    """``onnxslim fpga IN.onnx OUTDIR [--calib X.npz] [--set fpga.bits=8 ...]``."""
    p = _Parser(prog="onnxslim fpga", description="Lower a CNN to fixed point and write model.json, weights.npz, "
                "model.cpp/model.h/model_main.cpp, hls4ml_config.yaml and resources.json into OUTDIR.")
    p.add_argument("input", help="input ONNX model (never modified)")
    p.add_argument("outdir", help="output folder (created; the files in it are replaced atomically)")
    p.add_argument("--calib", help=".npz (one array per model input, axis 0 = samples), a folder of images with "
                   "--preprocess, or 'random' (unverified formats); the fixed-point formats come from it")
    p.add_argument("--preprocess", help="for an image folder: PRESET[,key=value,...] (see onnxslim --help)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="fpga.OPTION=VALUE")
    p.add_argument("--input-shape", dest="input_shapes", action="append", default=[], metavar="NAME=D0,D1,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true")
    args = p.parse_args(argv)
    sets = parse_set(args.sets)
    if set(sets) - {"fpga"}:
        raise UserError(f"onnxslim fpga takes only fpga.* options, got {', '.join(sorted(set(sets) - {'fpga'}))}")
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    check_outputs({f"output {out / name}": out / name for name in OUTPUT_NAMES}, inputs=(args.input, args.calib),
                  folders=(out,))
    options = sets.get("fpga", {})
    lowering = lower_model(args.input, calib=args.calib, options=options,
                           input_shapes=parse_input_shapes(args.input_shapes), seed=args.seed,
                           preprocess=args.preprocess, require_calibration=True)
    reuse = FpgaPass(options).options.reuse_factor
    files = output_files(lowering, reuse)
    assert set(files) <= set(OUTPUT_NAMES), sorted(files)
    write_atomic_many({out / name: data for name, data in files.items()})
    for warning in lowering.warnings:
        print(f"onnxslim fpga: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(format_table(lowering.table))
        print(f"\nwrote {out}/: {', '.join(files)}")
    return 0
