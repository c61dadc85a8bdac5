"""Train the two digits CNN fixtures and write them as ONNX with un-fused BatchNormalization.

    python models/train_digits.py [--epochs 30] [--out models/examples] [--only digits_vgg]

Needs torch (a dev-only dependency); CPU only, deterministic (fixed seeds, deterministic
algorithms, 2 threads), well under two minutes on two cores.

The ONNX graphs are written by hand with ``onnx.helper`` from the trained ``state_dict`` rather
than with ``torch.onnx.export``, so that every BatchNorm stays a separate
``BatchNormalization`` node (the compiler under test folds them) and the graph layout does not
depend on exporter versions.  Each written model is checked against torch eval output.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

try:
    from onnxslim_cnn.models import digits
except ImportError:  # running from a checkout without the package installed
    import importlib.util
    import sys

    _spec = importlib.util.spec_from_file_location("digits", Path(__file__).with_name("digits.py"))
    digits = importlib.util.module_from_spec(_spec)
    sys.modules["digits"] = digits
    _spec.loader.exec_module(digits)

OPSET = 17
IR_VERSION = 8
BN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class DigitsVGG(nn.Module):
    """conv3x3-BN-ReLU-maxpool x3 (16, 32, 64 ch) -> Flatten -> FC 1024-256-256-10.

    The classifier holds 93% of the 354k parameters (the SVD passes target it).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in (16, 32, 64):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=True),
                nn.BatchNorm2d(c, eps=BN_EPS),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, 2),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out, eps=BN_EPS)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.dw_bn = nn.BatchNorm2d(c_in, eps=BN_EPS)
        self.pw = nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False)
        self.pw_bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw_bn(self.pw(F.relu(self.dw_bn(self.dw(x))))))


class DigitsResNet(nn.Module):
    """stem conv3x3(16)-BN-ReLU-maxpool -> layer1 (16, identity) -> layer2 (32, stride 2, 1x1
    projection) -> dsconv (dw3x3 s2 + BN + ReLU, pw 1x1 32->64 + BN + ReLU) -> layer3 (64,
    identity) -> GlobalAveragePool -> Flatten -> fc (Gemm 64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.maxpool = nn.MaxPool2d(2, 2)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.dsconv = DepthwiseSeparable(32, 64, 2)
        self.layer3 = BasicBlock(64, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.dsconv(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Hand-written ONNX export
# --------------------------------------------------------------------------------------------


class _GraphBuilder:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.detach().cpu().numpy() for k, v in state.items()}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._used: set[str] = set()

    def _init(self, name: str) -> str:
        if name not in self._used:
            self._used.add(name)
            self.inits.append(numpy_helper.from_array(self.state[name].astype(np.float32), name))
        return name

    def _node(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out or f"{name}.out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, prefix: str, mod: nn.Conv2d) -> str:
        ins = [x, self._init(f"{prefix}.weight")]
        if mod.bias is not None:
            ins.append(self._init(f"{prefix}.bias"))
        k, s, p = mod.kernel_size, mod.stride, mod.padding
        return self._node(
            "Conv", ins, prefix,
            kernel_shape=list(k), strides=list(s), pads=[p[0], p[1], p[0], p[1]],
            dilations=list(mod.dilation), group=mod.groups,
        )

    def bn(self, x: str, prefix: str, mod: nn.BatchNorm2d) -> str:
        ins = [x] + [self._init(f"{prefix}.{s}") for s in ("weight", "bias", "running_mean", "running_var")]
        return self._node("BatchNormalization", ins, prefix, epsilon=float(mod.eps), momentum=0.9)

    def relu(self, x: str, name: str) -> str:
        return self._node("Relu", [x], name)

    def maxpool(self, x: str, name: str, mod: nn.MaxPool2d) -> str:
        k, s = mod.kernel_size, mod.stride
        return self._node("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s], pads=[0, 0, 0, 0])

    def add(self, a: str, b: str, name: str) -> str:
        return self._node("Add", [a, b], name)

    def gap(self, x: str, name: str) -> str:
        return self._node("GlobalAveragePool", [x], name)

    def flatten(self, x: str, name: str) -> str:
        return self._node("Flatten", [x], name, axis=1)

    def gemm(self, x: str, prefix: str, final: bool = False) -> str:
        ins = [x, self._init(f"{prefix}.weight"), self._init(f"{prefix}.bias")]
        return self._node("Gemm", ins, prefix, alpha=1.0, beta=1.0, transB=1, out="logits" if final else None)

    def model(self, graph_name: str, doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
        graph = helper.make_graph(self.nodes, graph_name, [x], [y], initializer=self.inits, doc_string=doc)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="onnxslim-cnn/models/train_digits.py",
            producer_version="1",
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(model, metadata)
        onnx.checker.check_model(model, full_check=True)
        return model


def export_vgg(net: DigitsVGG, metadata: dict[str, str]) -> onnx.ModelProto:
    g = _GraphBuilder(net.state_dict())
    x = "input"
    for i, mod in enumerate(net.features):
        name = f"features.{i}"
        if isinstance(mod, nn.Conv2d):
            x = g.conv(x, name, mod)
        elif isinstance(mod, nn.BatchNorm2d):
            x = g.bn(x, name, mod)
        elif isinstance(mod, nn.ReLU):
            x = g.relu(x, name)
        elif isinstance(mod, nn.MaxPool2d):
            x = g.maxpool(x, name, mod)
        else:
            raise TypeError(mod)
    x = g.flatten(x, "flatten")
    linears = [i for i, m in enumerate(net.classifier) if isinstance(m, nn.Linear)]
    for i, mod in enumerate(net.classifier):
        name = f"classifier.{i}"
        if isinstance(mod, nn.Linear):
            x = g.gemm(x, name, final=(i == linears[-1]))
        elif isinstance(mod, nn.ReLU):
            x = g.relu(x, name)
        # Dropout is the identity at inference.
    return g.model("digits_vgg", DigitsVGG.__doc__ or "", metadata)


def _export_block(g: _GraphBuilder, x: str, p: str, blk: BasicBlock) -> str:
    out = g.relu(g.bn(g.conv(x, f"{p}.conv1", blk.conv1), f"{p}.bn1", blk.bn1), f"{p}.relu1")
    out = g.bn(g.conv(out, f"{p}.conv2", blk.conv2), f"{p}.bn2", blk.bn2)
    if blk.downsample is not None:
        x = g.bn(g.conv(x, f"{p}.downsample.0", blk.downsample[0]), f"{p}.downsample.1", blk.downsample[1])
    return g.relu(g.add(out, x, f"{p}.add"), f"{p}.relu2")


def export_resnet(net: DigitsResNet, metadata: dict[str, str]) -> onnx.ModelProto:
    g = _GraphBuilder(net.state_dict())
    x = g.relu(g.bn(g.conv("input", "conv1", net.conv1), "bn1", net.bn1), "relu")
    x = g.maxpool(x, "maxpool", net.maxpool)
    x = _export_block(g, x, "layer1", net.layer1)
    x = _export_block(g, x, "layer2", net.layer2)
    d = net.dsconv
    x = g.relu(g.bn(g.conv(x, "dsconv.dw", d.dw), "dsconv.dw_bn", d.dw_bn), "dsconv.dw_relu")
    x = g.relu(g.bn(g.conv(x, "dsconv.pw", d.pw), "dsconv.pw_bn", d.pw_bn), "dsconv.pw_relu")
    x = _export_block(g, x, "layer3", net.layer3)
    x = g.flatten(g.gap(x, "avgpool"), "flatten")
    g.gemm(x, "fc", final=True)
    return g.model("digits_resnet", DigitsResNet.__doc__ or "", metadata)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels, padding with the background value."""
    bg = (0.0 - digits.MEAN) / digits.STD
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=bg)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return padded[:, 0][idx_n, rows[:, :, None], cols[:, None, :]][:, None]


def train(net: nn.Module, epochs: int, seed: int, lr: float = 2e-3, batch: int = 64) -> nn.Module:
    x_np, y_np = digits.load_split("train")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        total, correct = 0.0, 0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb, yb = _augment(x[idx], gen), y[idx]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1:3d}  loss {total / len(x):.4f}  train-acc {correct / len(x):.4f}", flush=True)
    net.eval()
    return net


def _check_onnx(net: nn.Module, model: onnx.ModelProto) -> float:
    import onnxruntime as ort

    x, _ = digits.load_split("test")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    diff = float(np.abs(got - ref).max())
    if diff >= 1e-4:
        raise AssertionError(f"ONNX output differs from torch eval output: max abs diff {diff:g}")
    return diff


def build(name: str, epochs: int, out_dir: Path) -> None:
    seed = {"digits_vgg": 1, "digits_resnet": 2}[name]
    torch.manual_seed(seed)
    net = DigitsVGG() if name == "digits_vgg" else DigitsResNet()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{name}: {n_params} parameters, training {epochs} epochs (seed {seed})", flush=True)
    t0 = time.perf_counter()
    train(net, epochs, seed)
    print(f"  trained in {time.perf_counter() - t0:.1f}s", flush=True)
    metadata = {
        "dataset": "sklearn.datasets.load_digits, bilinear 8x8->32x32, (x/16 - MEAN)/STD",
        "normalization": f"mean={digits.MEAN} std={digits.STD}",
        "split": f"train_test_split(test_size={digits.TEST_SIZE}, random_state={digits.SPLIT_SEED}, stratify=y)",
        "epochs": str(epochs),
        "seed": str(seed),
    }
    exporter = export_vgg if name == "digits_vgg" else export_resnet
    model = exporter(net, metadata)
    diff = _check_onnx(net, model)
    acc = digits.evaluate_top1(model, "test")
    helper.set_model_props(model, {**metadata, "test_top1": f"{acc:.4f}"})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"
    onnx.save(model, str(path))
    print(
        f"  wrote {path} ({path.stat().st_size} bytes); onnx-vs-torch max abs diff {diff:.2e}; "
        f"test top-1 {acc:.4f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=digits.EXAMPLES_DIR)
    ap.add_argument("--only", choices=digits.FIXTURES, action="append")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    for name in args.only or digits.FIXTURES:
        build(name, args.epochs, args.out)


if __name__ == "__main__":
    main()
