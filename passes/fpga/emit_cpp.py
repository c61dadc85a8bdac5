"""Fixed-point IR -> plain C++17 (``<cstdint>`` only), bit-exact with the numpy simulator.

One function per layer, weights as ``constexpr`` arrays, every loop with a compile-time trip
count and no dynamic allocation, as HLS tools (Vitis HLS, Catapult) expect; ``#pragma HLS``
lines mark the pipelined loop (other compilers ignore them). Two portability points that keep
the C++ equal to the simulator on every compiler: right shifts of negative numbers (implementation
defined before C++20) are written as ``~(~v >> s)``, and left shifts as multiplications (shifting
a negative number left is undefined before C++20).
"""

from __future__ import annotations

import os

import numpy as np

from onnxslim_cnn.fixed_point.ir import FixedFormat, FixedPointModel, Layer, to_hls_name

_HELPERS = """\
// floor(v / 2^s) for s > 0, without right-shifting a negative number
static inline int64_t floor_shift(int64_t v, int s) { return v >= 0 ? (v >> s) : ~((~v) >> s); }
static inline int64_t round_shift(int64_t v, int s, int mode) {
  if (s <= 0) return v * ((int64_t)1 << -s);  // exact scale-up
  const int64_t f = floor_shift(v, s);
  if (mode == 0) return f;                                   // trunc (AP_TRN)
  const int64_t rem = v - f * ((int64_t)1 << s), half = (int64_t)1 << (s - 1);
  if (mode == 1) return f + (rem >= half ? 1 : 0);           // round half up (AP_RND)
  return f + ((rem > half || (rem == half && (f & 1))) ? 1 : 0);  // half to even (AP_RND_CONV)
}
static inline int64_t saturate(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
static inline int64_t wrap(int64_t v, int width, bool is_signed) {  // keep the low bits (AP_WRAP)
  const uint64_t u = (uint64_t)v & (((uint64_t)1 << width) - 1);
  if (is_signed && u >= ((uint64_t)1 << (width - 1))) return (int64_t)u - (int64_t)((uint64_t)1 << width);
  return (int64_t)u;
}
"""
_ROUND = {"trunc": 0, "round_half_up": 1, "round_half_even": 2}


def ctype(fmt: FixedFormat) -> str:
    for bits in (8, 16, 32, 64):
        if fmt.width <= bits:
            return f"{'' if fmt.signed else 'u'}int{bits}_t"
    raise ValueError(fmt)


def _array(name: str, values: np.ndarray, fmt: FixedFormat) -> str:
    flat = np.asarray(values, dtype=np.int64).ravel()
    rows = [", ".join(str(int(v)) for v in flat[i:i + 24]) for i in range(0, flat.size, 24)]
    body = ",\n  ".join(rows)
    return f"constexpr {ctype(fmt)} {name}[{flat.size}] = {{\n  {body}}};\n"


def _unique(names: dict[str, str]) -> dict[str, str]:
    seen: set[str] = set()
    out = {}
    for key, ident in names.items():
        cand, k = ident, 1
        while cand in seen:
            cand, k = f"{ident}_{k}", k + 1
        seen.add(cand)
        out[key] = cand
    return out


class _Emitter:
    def __init__(self, model: FixedPointModel, reuse_factor: int):
        self.m, self.reuse = model, reuse_factor
        # distinct ONNX names can map to one C identifier ("a.b", "a_b"): number the repeats
        self.ident = _unique({t: f"t_{to_hls_name(t)}" for t in model.tensors})
        self.fns = _unique({l.name: f"layer_{to_hls_name(l.name)}" for l in model.layers})
        self.base = {l.name: self.fns[l.name][len("layer_"):] for l in model.layers}

    def sig(self, layer: Layer) -> str:
        ins = ", ".join(f"const {ctype(self.m.tensors[i].fmt)} in{k}[{self.m.tensors[i].size}]"
                        for k, i in enumerate(layer.inputs))
        out = self.m.tensors[layer.output]
        return f"static void {self.fn(layer)}({ins}, {ctype(out.fmt)} out[{out.size}])"

    def fn(self, layer: Layer) -> str:
        return self.fns[layer.name]

    def weights(self, layer: Layer) -> str:
        if layer.op not in ("conv2d", "dense"):
            return ""
        wf = FixedFormat(**layer.attrs["weight_format"])
        acc = self.m.tensors[layer.output].fmt
        base = self.base[layer.name]
        return (f"// {layer.name}: weights {wf.hls()}, bias at the accumulator's {acc.hls()}\n"
                + _array(f"w_{base}", layer.weights["weight"], wf) + _array(f"b_{base}", layer.weights["bias"], acc))

    def body(self, layer: Layer) -> str:
        t = self.m.tensors
        a, out = layer.attrs, t[layer.output]
        x = t[layer.inputs[0]]
        acc_t = "int64_t" if out.fmt.width > 32 else "int32_t"
        base = self.base[layer.name]
        pipe = f"#pragma HLS PIPELINE II={self.reuse}"
        if layer.op == "conv2d":
            c, h, w = x.shape
            o, oh, ow = out.shape
            kh, kw = a["kernel"]
            sh, sw = a["stride"]
            pt, pl, pb, pr = a["pads"]
            g = a["groups"]
            cg, og = c // g, o // g
            hp, wp = h + pt + pb, w + pl + pr
            xt = ctype(x.fmt)
            # a zero-bordered copy (what an HLS line buffer holds) keeps the MAC loop free of bounds tests
            pad = "" if not any(a["pads"]) else f"""\
  static {xt} padded[{c * hp * wp}];
  for (int i = 0; i < {c * hp * wp}; ++i) padded[i] = 0;
  for (int ch = 0; ch < {c}; ++ch)
    for (int y = 0; y < {h}; ++y)
      for (int x = 0; x < {w}; ++x) {{
{pipe}
        padded[(ch * {hp} + y + {pt}) * {wp} + x + {pl}] = in0[(ch * {h} + y) * {w} + x];
      }}
"""
            src = "padded" if pad else "in0"
            return pad + f"""\
  for (int co = 0; co < {o}; ++co) {{
    const int g = co / {og};
    for (int oy = 0; oy < {oh}; ++oy) {{
      for (int ox = 0; ox < {ow}; ++ox) {{
{pipe}
        {acc_t} acc = b_{base}[co];
        for (int ci = 0; ci < {cg}; ++ci)
          for (int ky = 0; ky < {kh}; ++ky)
            for (int kx = 0; kx < {kw}; ++kx)
              acc += ({acc_t}){src}[((g * {cg} + ci) * {hp} + oy * {sh} + ky) * {wp} + ox * {sw} + kx]
                     * ({acc_t})w_{base}[((co * {cg} + ci) * {kh} + ky) * {kw} + kx];
        out[(co * {oh} + oy) * {ow} + ox] = acc;
      }}
    }}
  }}
"""
        if layer.op == "dense":
            n, m = x.size, out.size
            return f"""\
  for (int o = 0; o < {m}; ++o) {{
    {acc_t} acc = b_{base}[o];
    for (int i = 0; i < {n}; ++i) {{
{pipe}
      acc += ({acc_t})in0[i] * ({acc_t})w_{base}[o * {n} + i];
    }}
    out[o] = acc;
  }}
"""
        if layer.op in ("add", "concat"):
            terms = [f"(int64_t)in{k}[i] * {1 << (out.fmt.frac - t[n].fmt.frac)}" for k, n in enumerate(layer.inputs)]
            if layer.op == "add":
                return f"  for (int i = 0; i < {out.size}; ++i) {{\n{pipe}\n    out[i] = ({ctype(out.fmt)})({' + '.join(terms)});\n  }}\n"
            code, offset = "", 0
            for k, n in enumerate(layer.inputs):
                code += (f"  for (int i = 0; i < {t[n].size}; ++i) {{\n{pipe}\n"
                         f"    out[{offset} + i] = ({ctype(out.fmt)})({terms[k]});\n  }}\n")
                offset += t[n].size
            return code
        if layer.op in ("relu", "clip", "flatten"):
            lo, hi = (0, None) if layer.op == "relu" else (a["lo"], a["hi"]) if layer.op == "clip" else (None, None)
            body = "    int64_t v = in0[i];\n"
            # a bound the input type cannot cross is left out (-Wtype-limits, and nothing to do)
            if lo is not None and lo > x.fmt.min_int:
                body += f"    if (v < {lo}LL) v = {lo}LL;\n"
            if hi is not None and hi < x.fmt.max_int:
                body += f"    if (v > {hi}LL) v = {hi}LL;\n"
            return f"  for (int i = 0; i < {out.size}; ++i) {{\n{pipe}\n{body}    out[i] = ({ctype(out.fmt)})v;\n  }}\n"
        if layer.op in ("maxpool", "avgpool", "global_avgpool"):
            c, h, w = x.shape
            _, oh, ow = out.shape
            if layer.op == "global_avgpool":
                kh, kw, sh, sw, pt, pl = h, w, 1, 1, 0, 0
            else:
                (kh, kw), (sh, sw), (pt, pl) = a["kernel"], a["stride"], a["pads"][:2]
            init, update = (f"{x.fmt.min_int}LL", "if (v > acc) acc = v;") if layer.op == "maxpool" else ("0", "acc += v;")
            return f"""\
  for (int ch = 0; ch < {c}; ++ch)
    for (int oy = 0; oy < {oh}; ++oy)
      for (int ox = 0; ox < {ow}; ++ox) {{
{pipe}
        int64_t acc = {init};
        for (int ky = 0; ky < {kh}; ++ky)
          for (int kx = 0; kx < {kw}; ++kx) {{
            const int iy = oy * {sh} - {pt} + ky, ix = ox * {sw} - {pl} + kx;
            if (iy >= 0 && iy < {h} && ix >= 0 && ix < {w}) {{
              const int64_t v = in0[(ch * {h} + iy) * {w} + ix];
              {update}
            }}
          }}
        out[(ch * {oh} + oy) * {ow} + ox] = ({ctype(out.fmt)})acc;
      }}
"""
        if layer.op == "requant":
            f = out.fmt
            sat = (f"saturate(v, {f.min_int}LL, {f.max_int}LL)" if a["saturation"] == "sat"
                   else f"wrap(v, {f.width}, {'true' if f.signed else 'false'})")
            return f"""\
  for (int i = 0; i < {out.size}; ++i) {{
{pipe}
    int64_t v = round_shift((int64_t)in0[i] * {a['multiplier']}LL, {a['shift']}, {_ROUND[a['rounding']]});
    out[i] = ({ctype(f)}){sat};
  }}
"""
        raise ValueError(f"no C++ for IR op {layer.op!r}")

    def source(self) -> str:
        m = self.m
        parts = ["// Generated by onnxslim-cnn (pass fpga) from the fixed-point IR; bit-exact with its simulator.\n"
                 "#include <cstdint>\n#include \"model.h\"\n\nnamespace fpga_model {\n\n", _HELPERS, "\n"]
        for layer in m.layers:
            parts.append(self.weights(layer))
        for layer in m.layers:
            ins = ", ".join(f"{n} {m.tensors[n].fmt}" for n in layer.inputs)
            o = m.tensors[layer.output]
            parts.append(f"\n// {layer.op} {layer.name}: {ins} -> {o.name} {o.fmt} {o.fmt.hls()} shape {list(o.shape)}\n"
                         f"{self.sig(layer)} {{\n{self.body(layer)}}}\n")
        ins = ", ".join(f"const {ctype(m.tensors[n].fmt)} {self.ident[n]}[{m.tensors[n].size}]" for n in m.inputs)
        outs = ", ".join(f"{ctype(m.tensors[n].fmt)} {self.ident[n]}[{m.tensors[n].size}]" for n in m.outputs)
        top = [f"\nvoid inference({ins}, {outs}) {{\n"]
        for name, tensor in m.tensors.items():
            if name not in m.inputs and name not in m.outputs:
                top.append(f"  static {ctype(tensor.fmt)} {self.ident[name]}[{tensor.size}];  // {tensor.fmt}\n")
        for layer in m.layers:
            args = ", ".join(self.ident[n] for n in layer.inputs + [layer.output])
            top.append(f"  {self.fn(layer)}({args});\n")
        top.append("}\n\n}  // namespace fpga_model\n")
        return "".join(parts + top)

    def header(self) -> str:
        m = self.m
        lines = ["// Generated by onnxslim-cnn (pass fpga).\n#pragma once\n#include <cstdint>\n\nnamespace fpga_model {\n"]
        for kind, names in (("INPUT", m.inputs), ("OUTPUT", m.outputs)):
            for k, n in enumerate(names):
                t = m.tensors[n]
                lines.append(f"// {kind.lower()} {k} '{n}': {t.fmt.hls()} codes (value = code * 2^-{t.fmt.frac}), shape {list(t.shape)}\n"
                             f"using {kind.lower()}{k}_t = {ctype(t.fmt)};\n"
                             f"constexpr int {kind}{k}_SIZE = {t.size};\nconstexpr int {kind}{k}_FRAC = {t.fmt.frac};\n")
        ins = ", ".join(f"const input{k}_t in{k}[INPUT{k}_SIZE]" for k in range(len(m.inputs)))
        outs = ", ".join(f"output{k}_t out{k}[OUTPUT{k}_SIZE]" for k in range(len(m.outputs)))
        lines.append(f"void inference({ins}, {outs});\n\n}}  // namespace fpga_model\n")
        return "".join(lines)


MAIN = """\
// Test harness: model_main IN.bin OUT.bin N reads N inputs as int64 codes, writes N outputs as
// int64 codes, and prints the mean run time per image in microseconds.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "model.h"
using namespace fpga_model;

int main(int argc, char** argv) {
  if (argc != 4) { std::fprintf(stderr, "usage: %s IN.bin OUT.bin N\\n", argv[0]); return 2; }
  const long n = std::atol(argv[3]);
  std::vector<int64_t> in((size_t)n * INPUT0_SIZE), out((size_t)n * OUTPUT0_SIZE);
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(in.data(), sizeof(int64_t), in.size(), f) != in.size()) { std::fprintf(stderr, "cannot read %s\\n", argv[1]); return 1; }
  std::fclose(f);
  input0_t x[INPUT0_SIZE];
  output0_t y[OUTPUT0_SIZE];
  double seconds = 0.0;
  for (long k = 0; k < n; ++k) {
    for (int i = 0; i < INPUT0_SIZE; ++i) x[i] = (input0_t)in[(size_t)k * INPUT0_SIZE + i];
    const auto t0 = std::chrono::steady_clock::now();
    inference(x, y);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int i = 0; i < OUTPUT0_SIZE; ++i) out[(size_t)k * OUTPUT0_SIZE + i] = y[i];
  }
  f = std::fopen(argv[2], "wb");
  if (!f || std::fwrite(out.data(), sizeof(int64_t), out.size(), f) != out.size()) { std::fprintf(stderr, "cannot write %s\\n", argv[2]); return 1; }
  std::fclose(f);
  std::printf("us_per_image %.3f\\n", 1e6 * seconds / (n > 0 ? n : 1));
  return 0;
}
"""


def emit_cpp(model: FixedPointModel, reuse_factor: int = 1) -> dict[str, str]:
    """{file name: text}: model.h, model.cpp, and model_main.cpp (a harness for one input, one output)."""
    e = _Emitter(model, reuse_factor)
    files = {"model.h": e.header(), "model.cpp": e.source()}
    if len(model.inputs) == 1 and len(model.outputs) == 1:
        files["model_main.cpp"] = MAIN
    return files


def build_and_run(model: FixedPointModel, codes: np.ndarray, workdir: "str | os.PathLike",
                  compiler: str = "g++", flags: tuple = ("-std=c++17", "-O2", "-Wall", "-Wextra",
                                                         "-Wno-unknown-pragmas", "-Werror")) -> tuple[np.ndarray, float]:
    """Emit, compile with ``compiler`` and run the harness on integer input ``codes`` (N, ...);
    returns (integer outputs (N, ...), mean microseconds per image). For tests and benches."""
    import subprocess
    from pathlib import Path

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    for name, text in emit_cpp(model).items():
        (work / name).write_text(text)
    exe = work / "model_main"
    subprocess.run([compiler, *flags, "-o", str(exe), str(work / "model.cpp"), str(work / "model_main.cpp")],
                   check=True, capture_output=True, text=True)
    n = int(codes.shape[0])
    np.ascontiguousarray(codes, dtype="<i8").tofile(work / "in.bin")
    done = subprocess.run([str(exe), str(work / "in.bin"), str(work / "out.bin"), str(n)], check=True,
                          capture_output=True, text=True)
    out = np.fromfile(work / "out.bin", dtype="<i8").reshape((n,) + model.tensors[model.outputs[0]].shape)
    return out, float(done.stdout.split()[1])
