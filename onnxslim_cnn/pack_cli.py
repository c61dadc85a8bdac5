"""``onnxslim pack IN.onnx OUT.onnxz`` and ``onnxslim unpack IN.onnxz OUT.onnx`` (see container.py).

The pack report is the Deep Compression table of Han et al. (the seed's AlexNet table): per
layer, weights kept (P), bits per stored weight before and after Huffman (P+Q, P+Q+H), bits per
relative index before and after Huffman, and the layer's stored size against float32.
"""

from __future__ import annotations

import argparse
import json

from .container import TensorPlan, pack_file, unpack_file
from .errors import UserError
from .files import write_atomic


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "None":
        raise UserError(f"{message} (see {self.prog} --help)")


def layer_rows(plans: "list[TensorPlan]") -> list[dict]:
    """One row per packed tensor plus a 'total' row, the columns of Han et al.'s table.

    Bits per weight are per *stored entry* (kept weights plus filler entries); compress rates
    are stored bits (incl. the layer's float codebook and the Huffman tables) over 32 bits per
    weight of the dense float layer. P+Q counts each entry at its fixed code and index width.
    """
    rows = []
    for p in plans:
        fixed = p.entries * (p.code_bits + p.index_bits) + 8 * p.codebook_bytes
        rows.append({"layer": p.layer, "tensor": p.name, "kind": p.kind, "encoding": p.encoding,
                     "weights": p.size, "kept": p.kept, "entries": p.entries,
                     "weights_pct": 100.0 * p.kept / p.size,
                     "weight_bits_pq": p.code_bits, "weight_bits_pqh": p.value_bits / max(p.entries, 1),
                     "index_bits_pq": p.index_bits, "index_bits_pqh": p.gap_bits / max(p.entries, 1),
                     "stored_bytes": p.stored_bytes + p.codebook_bytes,
                     "compress_pq_pct": 100.0 * fixed / (32 * p.size),
                     "compress_pqh_pct": 100.0 * 8 * (p.stored_bytes + p.codebook_bytes) / (32 * p.size)})
    if rows:
        n = sum(r["weights"] for r in rows)
        e = sum(r["entries"] for r in rows) or 1
        stored = sum(r["stored_bytes"] for r in rows)
        fixed = sum(r["compress_pq_pct"] * r["weights"] for r in rows) / n
        rows.append({"layer": "total", "weights": n, "kept": sum(r["kept"] for r in rows), "entries": e,
                     "weights_pct": 100.0 * sum(r["kept"] for r in rows) / n,
                     "weight_bits_pq": sum(r["weight_bits_pq"] * r["entries"] for r in rows) / e,
                     "weight_bits_pqh": sum(r["weight_bits_pqh"] * r["entries"] for r in rows) / e,
                     "index_bits_pq": sum(r["index_bits_pq"] * r["entries"] for r in rows) / e,
                     "index_bits_pqh": sum(r["index_bits_pqh"] * r["entries"] for r in rows) / e,
                     "stored_bytes": stored, "compress_pq_pct": fixed,
                     "compress_pqh_pct": 100.0 * 8 * stored / (32 * n)})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'layer':<22} {'#weights':>10} {'kept%':>6} {'wbits':>5} {'wbits':>6} {'ibits':>5} {'ibits':>6} "
            f"{'rate':>7} {'rate':>7}\n{'':<22} {'':>10} {'(P)':>6} {'P+Q':>5} {'P+Q+H':>6} {'P+Q':>5} {'P+Q+H':>6} "
            f"{'P+Q':>7} {'P+Q+H':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['layer'][:22]:<22} {r['weights']:>10,} {r['weights_pct']:>5.1f}% {r['weight_bits_pq']:>5.1f} "
                     f"{r['weight_bits_pqh']:>6.2f} {r['index_bits_pq']:>5.1f} {r['index_bits_pqh']:>6.2f} "
                     f"{r['compress_pq_pct']:>6.2f}% {r['compress_pqh_pct']:>6.2f}%")
    return "\n".join(lines)


def pack_main(argv: list[str]) -> int:
    p = _Parser(prog="onnxslim pack", description="Store a model with Deep Compression coding: sparse weights as "
                "Huffman-coded relative indices, shared weights (share pass) as Huffman-coded codebook indices.")
    p.add_argument("input", help="ONNX model (never modified)")
    p.add_argument("output", help="container to write (.onnxz), atomically")
    p.add_argument("--index-bits", type=int, default=0, metavar="N",
                   help="bits per relative index, 1..12; 0 (default) picks the smallest per tensor")
    p.add_argument("--report", help="also write the per-layer table as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no table")
    args = p.parse_args(argv)
    if not 0 <= args.index_bits <= 12:
        raise UserError(f"--index-bits must be within [0, 12], got {args.index_bits}")
    _check_paths(args.input, args.output, args.report)
    before, after, plans = pack_file(args.input, args.output, index_bits=args.index_bits)
    rows = layer_rows(plans)
    if args.report:
        doc = {"input_bytes": before, "container_bytes": after, "ratio": before / after, "layers": rows}
        write_atomic(args.report, json.dumps(doc, indent=2).encode("utf-8"))
    if not args.quiet:
        if rows:
            print(format_rows(rows))
        else:
            print("no sparse or shared weights found: the container holds the compressed protobuf only")
        size = f"{before / after:.1f}x smaller" if after < before else f"{after / before:.2f}x larger: nothing to code"
        print(f"\n{args.input}: {before:,} bytes -> {args.output}: {after:,} bytes ({size})")
    return 0


def unpack_main(argv: list[str]) -> int:
    p = _Parser(prog="onnxslim unpack", description="Restore the ONNX model stored by 'onnxslim pack', byte for byte.")
    p.add_argument("input", help="container (.onnxz)")
    p.add_argument("output", help="ONNX model to write, atomically")
    p.add_argument("--quiet", "-q", action="store_true")
    args = p.parse_args(argv)
    _check_paths(args.input, args.output)
    n = unpack_file(args.input, args.output)
    if not args.quiet:
        print(f"wrote {args.output} ({n:,} bytes)")
    return 0


def _check_paths(src: str, dst: str, report: "str | None" = None) -> None:
    """Before any work: an output that cannot be written, or is the input, writes nothing."""
    from .files import check_outputs

    check_outputs({"output": dst, "--report": report}, inputs=(src,))
