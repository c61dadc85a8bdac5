"""Seeded random-weight reference CNNs, built with plain ``onnx.helper`` (no torch).

Every builder has the signature::

    build_<name>(width=1.0, input_size=224, num_classes=1000, seed=0, batch="N") -> ModelProto

and produces an opset-17 / IR-8 float32 model with input ``input`` [batch, 3, S, S] and output
``logits`` [batch, num_classes], laid out like ``torch.onnx.export`` of the eval-mode torchvision
model (un-fused BatchNormalization with non-trivial statistics, Gemm with transB=1, no Dropout),
with torchvision module names (``layer1.0.conv1.weight``, ``features.3.squeeze`` ...).

At width=1, input 224, 1000 classes the parameter counts equal torchvision's
(:data:`TORCHVISION_PARAM_COUNTS`). ``width`` scales channels (``make_divisible(c*w, 8)`` for
MobileNetV2 / senet_small as torchvision does, ``max(8, round(c*w))`` elsewhere, including the
VGG/AlexNet FC hidden sizes); ``input_size`` scales the spatial size. VGG/AlexNet apply their
adaptive average pool (7x7 / 6x6) only when it is an exact integer pooling (or the identity) and
otherwise flatten the real feature map; max-pools that would shrink a feature map below their
kernel are left out, so small inputs (32, 64) work.

BatchNormalization keeps gamma ~ U(0.5, 1.5) and beta ~ N(0, 0.1); its running mean/var are
calibrated to the real per-channel statistics of the incoming activations (one onnxruntime pass
over seeded N(0,1) input, see ``GraphBuilder.calibrate_batchnorm``) and then jittered
(mean + N(0, 0.1)*std, var * U(0.5, 2)), like a trained network's, so activations stay O(1) and
the logits depend on the input. Convs use Kaiming-normal (fan-in) weights, torch-default biases.

``resnet20_cifar`` is He et al.'s CIFAR ResNet-20 with the parameter-free option-A shortcut:
stride-2 subsample (Slice) and channel zero-padding (Pad on axis 1), as torch exports it.

``senet_small`` is MobileNetV3-Small (depthwise convs, Squeeze-Excitation blocks
GlobalAveragePool -> 1x1 conv -> Relu -> 1x1 conv -> HardSigmoid -> Mul, HardSwish).

CLI: ``python -m onnxslim_cnn.models.reference NAME OUT.onnx [--width W] [--input-size S]
[--classes C] [--seed S] [--batch B]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

import numpy as np
import onnx

from .layers import BUFFER_SUFFIXES, GraphBuilder, make_divisible, scale_channels

__all__ = [
    "REFERENCE_MODELS", "TORCHVISION_PARAM_COUNTS", "build", "build_vgg16", "build_alexnet",
    "build_resnet18", "build_resnet50", "build_mobilenetv2", "build_squeezenet11",
    "build_senet_small", "build_resnet20_cifar", "count_parameters", "expected_param_count", "main",
]

# torchvision's sum(p.numel() for p in model.parameters()) at width 1, 224x224, 1000 classes.
TORCHVISION_PARAM_COUNTS = {
    "vgg16": 138_365_992,        # vgg16_bn
    "alexnet": 61_100_840,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenetv2": 3_504_872,    # mobilenet_v2
    "squeezenet11": 1_235_496,   # squeezenet1_1
    "senet_small": 2_542_856,    # mobilenet_v3_small
}

def _pool_if_fits(b: GraphBuilder, name: str, x: str, k: int, s: int, ceil: bool = False) -> str:
    """MaxPool, left out when the map is already smaller than the kernel (tiny inputs)."""
    _, h, w = b.shapes[x]
    return b.maxpool(name, x, k, s, ceil=ceil) if min(h, w) >= k else x


def _adaptive_pool_flatten(b: GraphBuilder, x: str, target: int) -> str:
    """torch's AdaptiveAvgPool2d(target) + flatten, only where it is an exact integer pooling."""
    _, h, w = b.shapes[x]
    if h == w and h > target and h % target == 0:
        x = b.avgpool("avgpool", x, h // target, h // target)
    return b.flatten("flatten", x)


# ---------------------------------------------------------------------------- VGG-16-BN
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]


def _vgg16(b: GraphBuilder, width: float, size: int, classes: int) -> str:
    x = b.input("input", 3, size, size)
    i = 0
    for v in _VGG16_CFG:
        if v == "M":
            x = _pool_if_fits(b, f"features.{i}", x, 2, 2)
            i += 1
        else:  # torchvision's vgg16_bn keeps the conv bias in front of the BN
            x = b.conv(f"features.{i}", x, scale_channels(v, width), 3, pad=1, bias=True)
            x = b.bn(f"features.{i + 1}", x)
            x = b.relu(f"features.{i + 2}", x)
            i += 3
    x = _adaptive_pool_flatten(b, x, 7)
    hidden = scale_channels(4096, width)
    x = b.relu("classifier.1", b.linear("classifier.0", x, hidden))
    x = b.relu("classifier.4", b.linear("classifier.3", x, hidden))
    return b.linear("classifier.6", x, classes, gain=1.0)


# ---------------------------------------------------------------------------- AlexNet
def _alexnet(b: GraphBuilder, width: float, size: int, classes: int) -> str:
    c = lambda n: scale_channels(n, width)  # noqa: E731
    x = b.input("input", 3, size, size)
    x = b.relu("features.1", b.conv("features.0", x, c(64), 11, 4, pad=2, bias=True))
    x = _pool_if_fits(b, "features.2", x, 3, 2)
    x = b.relu("features.4", b.conv("features.3", x, c(192), 5, pad=2, bias=True))
    x = _pool_if_fits(b, "features.5", x, 3, 2)
    x = b.relu("features.7", b.conv("features.6", x, c(384), 3, pad=1, bias=True))
    x = b.relu("features.9", b.conv("features.8", x, c(256), 3, pad=1, bias=True))
    x = b.relu("features.11", b.conv("features.10", x, c(256), 3, pad=1, bias=True))
    x = _pool_if_fits(b, "features.12", x, 3, 2)
    x = _adaptive_pool_flatten(b, x, 6)
    hidden = c(4096)
    x = b.relu("classifier.2", b.linear("classifier.1", x, hidden))
    x = b.relu("classifier.5", b.linear("classifier.4", x, hidden))
    return b.linear("classifier.6", x, classes, gain=1.0)


# ---------------------------------------------------------------------------- ResNet
def _basic_block(b: GraphBuilder, p: str, x: str, planes: int, stride: int) -> str:
    cin = b.shapes[x][0]
    y = b.relu(f"{p}.relu", b.bn(f"{p}.bn1", b.conv(f"{p}.conv1", x, planes, 3, stride)))
    y = b.bn(f"{p}.bn2", b.conv(f"{p}.conv2", y, planes, 3))
    if stride != 1 or cin != planes:
        x = b.bn(f"{p}.downsample.1", b.conv(f"{p}.downsample.0", x, planes, 1, stride, pad=0))
    return b.relu(f"{p}.relu", b.add(f"{p}.add", y, x))


def _bottleneck(b: GraphBuilder, p: str, x: str, planes: int, stride: int) -> str:
    cin, out = b.shapes[x][0], planes * 4
    y = b.relu(f"{p}.relu", b.bn(f"{p}.bn1", b.conv(f"{p}.conv1", x, planes, 1, pad=0)))
    y = b.relu(f"{p}.relu", b.bn(f"{p}.bn2", b.conv(f"{p}.conv2", y, planes, 3, stride)))
    y = b.bn(f"{p}.bn3", b.conv(f"{p}.conv3", y, out, 1, pad=0))
    if stride != 1 or cin != out:
        x = b.bn(f"{p}.downsample.1", b.conv(f"{p}.downsample.0", x, out, 1, stride, pad=0))
    return b.relu(f"{p}.relu", b.add(f"{p}.add", y, x))


def _resnet(block, layers):
    def arch(b: GraphBuilder, width: float, size: int, classes: int) -> str:
        x = b.input("input", 3, size, size)
        x = b.relu("relu", b.bn("bn1", b.conv("conv1", x, scale_channels(64, width), 7, 2, pad=3)))
        x = b.maxpool("maxpool", x, 3, 2, pad=1)
        for li, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            for j in range(n):
                stride = 2 if (li > 1 and j == 0) else 1
                x = block(b, f"layer{li}.{j}", x, scale_channels(planes, width), stride)
        x = b.flatten("flatten", b.global_avgpool("avgpool", x))
        return b.linear("fc", x, classes, gain=1.0)
    return arch


# ---------------------------------------------------------------------------- CIFAR ResNet-20 (option A)
_INT64_MAX = 2 ** 63 - 1  # torch.onnx's "to the end" in a Slice


def _int64(b: GraphBuilder, name: str, values) -> str:
    """An int64 initializer (Slice / Pad parameters): not a parameter, shared by name."""
    if name not in b._init_names:
        b._init_names.add(name)
        if b.materialize:
            b.initializers.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _shortcut_a(b: GraphBuilder, p: str, x: str, planes: int, stride: int) -> str:
    """He et al.'s option A shortcut (the CIFAR ResNets): subsample by the stride, zero-pad the
    new channels, no parameters. torch's ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4,
    planes // 4))`` exports as Slice(axes 2, 3, steps 2) -> Pad(constant) on the channel axis;
    for other widths the extra channels are split as evenly (the odd one after)."""
    c, h, w = b.shapes[x]
    if stride != 1:
        x = b._node("Slice", f"{p}.shortcut.slice",
                    [x, _int64(b, "shortcut.starts", [0, 0]), _int64(b, "shortcut.ends", [_INT64_MAX] * 2),
                     _int64(b, "shortcut.axes", [2, 3]), _int64(b, f"shortcut.steps{stride}", [stride, stride])],
                    (c, -(-h // stride), -(-w // stride)))
    if planes != c:
        lo = (planes - c) // 2
        _, h, w = b.shapes[x]
        pads = _int64(b, f"{p}.shortcut.pads", [0, lo, 0, 0, 0, planes - c - lo, 0, 0])
        x = b._node("Pad", f"{p}.shortcut.pad", [x, pads], (planes, h, w), mode="constant")
    return x


def _cifar_block(b: GraphBuilder, p: str, x: str, planes: int, stride: int) -> str:
    cin = b.shapes[x][0]
    y = b.relu(f"{p}.relu1", b.bn(f"{p}.bn1", b.conv(f"{p}.conv1", x, planes, 3, stride)))
    y = b.bn(f"{p}.bn2", b.conv(f"{p}.conv2", y, planes, 3))
    if stride != 1 or cin != planes:
        x = _shortcut_a(b, f"{p}", x, planes, stride)
    return b.relu(f"{p}.relu2", b.add(f"{p}.add", y, x))


def _resnet20_cifar(b: GraphBuilder, width: float, size: int, classes: int) -> str:
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2): 3x3 stem of 16, three stages of three
    basic blocks (16, 32, 64 channels; stride 2 at stages 2 and 3) with option-A shortcuts,
    global average pool, one FC. 269,722 parameters at width 1 with 10 classes."""
    x = b.input("input", 3, size, size)
    x = b.relu("relu", b.bn("bn1", b.conv("conv1", x, scale_channels(16, width), 3)))
    for li, planes in enumerate((16, 32, 64), start=1):
        for j in range(3):
            x = _cifar_block(b, f"layer{li}.{j}", x, scale_channels(planes, width), 2 if li > 1 and j == 0 else 1)
    x = b.flatten("flatten", b.global_avgpool("avgpool", x))
    return b.linear("linear", x, classes, gain=1.0)


# ---------------------------------------------------------------------------- MobileNetV2
_MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]


def _mobilenetv2(b: GraphBuilder, width: float, size: int, classes: int) -> str:
    x = b.input("input", 3, size, size)
    x = b.conv_bn_act("features.0", x, make_divisible(32 * width), 3, 2, act="relu6")
    i = 1
    for t, c, n, s in _MBV2_CFG:
        cout = make_divisible(c * width)
        for j in range(n):
            p, cin, stride = f"features.{i}.conv", b.shapes[x][0], s if j == 0 else 1
            hid, k = int(round(cin * t)), 0
            y = x
            if t != 1:
                y = b.conv_bn_act(f"{p}.{k}", y, hid, 1, act="relu6")
                k += 1
            y = b.conv_bn_act(f"{p}.{k}", y, hid, 3, stride, groups=hid, act="relu6")
            y = b.conv(f"{p}.{k + 1}", y, cout, 1, pad=0, gain=1.0)
            y = b.bn(f"{p}.{k + 2}", y)
            x = b.add(f"features.{i}.add", x, y) if (stride == 1 and cin == cout) else y
            i += 1
    x = b.conv_bn_act(f"features.{i}", x, make_divisible(1280 * max(1.0, width)), 1, act="relu6")
    x = b.flatten("flatten", b.global_avgpool("avgpool", x))
    return b.linear("classifier.1", x, classes, gain=1.0)


# ---------------------------------------------------------------------------- SqueezeNet 1.1
def _fire(b: GraphBuilder, p: str, x: str, sq: int, e1: int, e3: int) -> str:
    s = b.relu(f"{p}.squeeze_activation", b.conv(f"{p}.squeeze", x, sq, 1, pad=0, bias=True))
    a = b.relu(f"{p}.expand1x1_activation", b.conv(f"{p}.expand1x1", s, e1, 1, pad=0, bias=True))
    c = b.relu(f"{p}.expand3x3_activation", b.conv(f"{p}.expand3x3", s, e3, 3, pad=1, bias=True))
    return b.concat(f"{p}.cat", [a, c])


def _squeezenet11(b: GraphBuilder, width: float, size: int, classes: int) -> str:
    c = lambda n: scale_channels(n, width)  # noqa: E731
    x = b.input("input", 3, size, size)
    x = b.relu("features.1", b.conv("features.0", x, c(64), 3, 2, pad=0, bias=True))
    x = _pool_if_fits(b, "features.2", x, 3, 2, ceil=True)
    x = _fire(b, "features.3", x, c(16), c(64), c(64))
    x = _fire(b, "features.4", x, c(16), c(64), c(64))
    x = _pool_if_fits(b, "features.5", x, 3, 2, ceil=True)
    x = _fire(b, "features.6", x, c(32), c(128), c(128))
    x = _fire(b, "features.7", x, c(32), c(128), c(128))
    x = _pool_if_fits(b, "features.8", x, 3, 2, ceil=True)
    x = _fire(b, "features.9", x, c(48), c(192), c(192))
    x = _fire(b, "features.10", x, c(48), c(192), c(192))
    x = _fire(b, "features.11", x, c(64), c(256), c(256))
    x = _fire(b, "features.12", x, c(64), c(256), c(256))
    x = b.conv("classifier.1", x, classes, 1, pad=0, bias=True)
    x = b.global_avgpool("classifier.3", b.relu("classifier.2", x))
    return b.flatten("flatten", x)


# ---------------------------------------------------------------------------- senet_small
# MobileNetV3-Small: kernel, expanded, out, use_se, activation, stride.
_MBV3S_CFG = [(3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2),
              (3, 88, 24, False, "relu", 1), (5, 96, 40, True, "hardswish", 2),
              (5, 240, 40, True, "hardswish", 1), (5, 240, 40, True, "hardswish", 1),
              (5, 120, 48, True, "hardswish", 1), (5, 144, 48, True, "hardswish", 1),
              (5, 288, 96, True, "hardswish", 2), (5, 576, 96, True, "hardswish", 1),
              (5, 576, 96, True, "hardswish", 1)]


def _squeeze_excite(b: GraphBuilder, p: str, x: str) -> str:
    c = b.shapes[x][0]
    s = b.global_avgpool(f"{p}.avgpool", x)
    s = b.relu(f"{p}.activation", b.conv(f"{p}.fc1", s, make_divisible(c // 4), 1, pad=0, bias=True))
    s = b.conv(f"{p}.fc2", s, c, 1, pad=0, bias=True, gain=1.0)
    return b.mul(f"{p}.mul", x, b.hardsigmoid(f"{p}.scale_activation", s))


def _senet_small(b: GraphBuilder, width: float, size: int, classes: int) -> str:
    ch = lambda n: make_divisible(n * width)  # noqa: E731
    x = b.input("input", 3, size, size)
    x = b.conv_bn_act("features.0", x, ch(16), 3, 2, act="hardswish")
    for i, (k, exp, out, se, act, stride) in enumerate(_MBV3S_CFG, start=1):
        p, cin, exp, out = f"features.{i}.block", b.shapes[x][0], ch(exp), ch(out)
        y, j = x, 0
        if exp != cin:
            y = b.conv_bn_act(f"{p}.{j}", y, exp, 1, act=act)
            j += 1
        y = b.conv_bn_act(f"{p}.{j}", y, exp, k, stride, groups=exp, act=act)
        j += 1
        if se:
            y = _squeeze_excite(b, f"{p}.{j}", y)
            j += 1
        y = b.conv_bn_act(f"{p}.{j}", y, out, 1, act=None, gain=1.0)
        x = b.add(f"features.{i}.add", x, y) if (stride == 1 and cin == out) else y
    x = b.conv_bn_act(f"features.{len(_MBV3S_CFG) + 1}", x, 6 * b.shapes[x][0], 1, act="hardswish")
    x = b.flatten("flatten", b.global_avgpool("avgpool", x))
    x = b.hardswish("classifier.1", b.linear("classifier.0", x, ch(1024)))
    return b.linear("classifier.3", x, classes, gain=1.0)


# ---------------------------------------------------------------------------- public API
_ARCHS: dict[str, Callable[[GraphBuilder, float, int, int], str]] = {
    "vgg16": _vgg16,
    "alexnet": _alexnet,
    "resnet18": _resnet(_basic_block, (2, 2, 2, 2)),
    "resnet50": _resnet(_bottleneck, (3, 4, 6, 3)),
    "mobilenetv2": _mobilenetv2,
    "squeezenet11": _squeezenet11,
    "senet_small": _senet_small,
    "resnet20_cifar": _resnet20_cifar,
}


def _check_args(name: str, width: float, input_size: int, num_classes: int) -> None:
    if name not in _ARCHS:
        raise KeyError(f"unknown reference model {name!r}; valid names: {sorted(_ARCHS)}")
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if int(input_size) < 16:
        raise ValueError(f"input_size must be >= 16, got {input_size!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")


def _build(name: str, width: float = 1.0, input_size: int = 224, num_classes: int = 1000,
           seed: int = 0, batch: str | int = "N") -> onnx.ModelProto:
    _check_args(name, width, input_size, num_classes)
    b = GraphBuilder(seed=seed, batch=batch)
    out = _ARCHS[name](b, float(width), int(input_size), int(num_classes))
    b.calibrate_batchnorm("input")
    model = b.to_model(out, graph_name=name)
    model.doc_string = (f"reference {name} width={width} input_size={input_size} "
                        f"num_classes={num_classes} seed={seed} (random weights)")
    return model


def _make_builder(name: str):
    def fn(width: float = 1.0, input_size: int = 224, num_classes: int = 1000, seed: int = 0,
           batch: str | int = "N") -> onnx.ModelProto:
        return _build(name, width, input_size, num_classes, seed, batch)
    fn.__name__ = fn.__qualname__ = f"build_{name}"
    fn.__doc__ = f"Seeded random-weight {name} (see module docstring)."
    return fn


build_vgg16 = _make_builder("vgg16")
build_alexnet = _make_builder("alexnet")
build_resnet18 = _make_builder("resnet18")
build_resnet50 = _make_builder("resnet50")
build_mobilenetv2 = _make_builder("mobilenetv2")
build_squeezenet11 = _make_builder("squeezenet11")
build_senet_small = _make_builder("senet_small")
build_resnet20_cifar = _make_builder("resnet20_cifar")

REFERENCE_MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "vgg16": build_vgg16,
    "alexnet": build_alexnet,
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "mobilenetv2": build_mobilenetv2,
    "squeezenet11": build_squeezenet11,
    "senet_small": build_senet_small,
    "resnet20_cifar": build_resnet20_cifar,
}


def build(name: str, **kw) -> onnx.ModelProto:
    """``REFERENCE_MODELS[name](**kw)``; ``KeyError`` listing the valid names if unknown."""
    if name not in REFERENCE_MODELS:
        raise KeyError(f"unknown reference model {name!r}; valid names: {sorted(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name](**kw)


def count_parameters(model: onnx.ModelProto) -> int:
    """torch-style parameter count: all float initializers except BN buffers (running_mean/var)
    and scalar constants (Clip bounds); int64 Slice/Pad parameters are not weights."""
    n = 0
    for init in model.graph.initializer:
        if init.name.endswith(BUFFER_SUFFIXES) or len(init.dims) == 0 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        n += int(np.prod(init.dims, dtype=np.int64))
    return n


def expected_param_count(name: str, width: float = 1.0, input_size: int = 224,
                         num_classes: int = 1000) -> int:
    """Parameter count computed from shapes alone (no weights are created; instant for VGG)."""
    _check_args(name, width, input_size, num_classes)
    b = GraphBuilder(materialize=False)
    _ARCHS[name](b, float(width), int(input_size), int(num_classes))
    return b.param_count


def save(model: onnx.ModelProto, path: str) -> None:
    """Save; models over ~2 GB go to external data next to ``path``."""
    if model.ByteSize() > 2_000_000_000:
        import os
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
    else:
        onnx.save_model(model, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onnxslim_cnn.models.reference",
                                 description="Write a seeded random-weight reference CNN as ONNX.")
    ap.add_argument("name", choices=sorted(REFERENCE_MODELS))
    ap.add_argument("out", help="output .onnx path")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", default="N", help='batch dim: symbolic name or integer (default "N")')
    a = ap.parse_args(argv)
    batch: str | int = int(a.batch) if a.batch.isdigit() else a.batch
    model = build(a.name, width=a.width, input_size=a.input_size, num_classes=a.classes,
                  seed=a.seed, batch=batch)
    save(model, a.out)
    print(f"{a.name}: {count_parameters(model):,} parameters, {len(model.graph.node)} nodes "
          f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
