"""Tests for the seeded reference CNN builders (onnxslim_cnn.models.reference)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxslim_cnn.models import reference as ref

NAMES = ["vgg16", "alexnet", "resnet18", "resnet50", "mobilenetv2", "squeezenet11", "senet_small", "resnet20_cifar"]
SMALL = dict(width=0.25, num_classes=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def small_models() -> dict[tuple[str, int], onnx.ModelProto]:
    return {(n, s): ref.build(n, input_size=s, **SMALL) for n in NAMES for s in (32, 64)}


def test_registry_and_builders():
    assert sorted(ref.REFERENCE_MODELS) == sorted(NAMES)
    for n in NAMES:
        assert ref.REFERENCE_MODELS[n] is getattr(ref, f"build_{n}")
        assert ref.REFERENCE_MODELS[n].__name__ == f"build_{n}"


@pytest.mark.parametrize("fn", [ref.build, ref.expected_param_count])
def test_unknown_name_raises_keyerror_listing_names(fn):
    with pytest.raises(KeyError) as exc:
        fn("resnet1000")
    for n in NAMES:
        assert n in str(exc.value)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", NAMES)
def test_small_model_checks_and_runs(small_models, name, size):
    model = small_models[(name, size)]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["N", 3, size, size] and out_dims == ["N", 10]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Constant", "Dropout"}
    int64_users = {"Slice", "Pad"}  # resnet20_cifar's option-A shortcut: index inputs, not weights
    index_inputs = {i for n in model.graph.node if n.op_type in int64_users for i in n.input[1:]}
    assert all(t.data_type == onnx.TensorProto.FLOAT or t.data_type == onnx.TensorProto.INT64 and t.name in index_inputs
               for t in model.graph.initializer)

    x = np.random.default_rng(123).standard_normal((2, 3, size, size)).astype(np.float32)
    y = _run(model, x)
    assert y.shape == (2, 10) and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert 1e-2 < y.std() < 1e2, y.std()
    assert y.std(axis=1).min() > 1e-3 * y.std()             # classes differ
    assert np.abs(y[0] - y[1]).max() > 1e-2 * y.std()         # output depends on the input


def test_integer_batch_dim():
    model = ref.build_resnet18(width=0.25, input_size=32, num_classes=5, batch=3)
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [3, 5]
    x = np.zeros((3, 3, 32, 32), np.float32)
    assert _run(model, x).shape == (3, 5)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    a = ref.build(name, input_size=32, seed=7, **SMALL).SerializeToString()
    b = ref.REFERENCE_MODELS[name](input_size=32, seed=7, **SMALL).SerializeToString()
    c = ref.build(name, input_size=32, seed=8, **SMALL).SerializeToString()
    assert a == b
    assert a != c


def test_torchvision_param_counts_analytic():
    assert ref.TORCHVISION_PARAM_COUNTS == {
        "vgg16": 138_365_992, "alexnet": 61_100_840, "resnet18": 11_689_512,
        "resnet50": 25_557_032, "mobilenetv2": 3_504_872, "squeezenet11": 1_235_496,
        "senet_small": 2_542_856}
    for n in ref.TORCHVISION_PARAM_COUNTS:
        assert ref.expected_param_count(n) == ref.TORCHVISION_PARAM_COUNTS[n], n
    # Independent closed forms for the two nets too big to build here.
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(9 * ci * co + co + 2 * co for ci, co in zip([3] + cfg, cfg))  # w + b + BN g/b
    vgg = convs + (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert vgg == 138_365_992
    alex_convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    alex = sum(k * k * ci * co + co for ci, co, k in alex_convs)
    alex += (9216 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert alex == 61_100_840


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2", "squeezenet11",
                                  "senet_small"])
def test_torchvision_param_counts_built(name):
    model = ref.build(name)  # full size: < ~1 s each
    assert ref.count_parameters(model) == ref.TORCHVISION_PARAM_COUNTS[name]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", NAMES)
def test_expected_count_matches_built(small_models, name, size):
    assert (ref.count_parameters(small_models[(name, size)])
            == ref.expected_param_count(name, input_size=size, **SMALL))


def test_count_parameters_skips_buffers():
    model = ref.build_mobilenetv2(input_size=32, **SMALL)
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    buffers = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                  if t.name.endswith(("running_mean", "running_var")) or not t.dims)
    assert buffers > 0
    assert ref.count_parameters(model) == total - buffers


def test_batchnorm_statistics_are_nontrivial(small_models):
    for name in ["vgg16", "resnet18", "resnet50", "mobilenetv2", "senet_small"]:
        model = small_models[(name, 64)]
        inits = _inits(model)
        bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
        assert bns, name
        for node in bns:
            gamma, beta, mean, var = (inits[i] for i in node.input[1:])
            attrs = {a.name: a for a in node.attribute}
            assert attrs["epsilon"].f == pytest.approx(1e-5)
            assert ((gamma >= 0.5) & (gamma <= 1.5)).all() and gamma.std() > 0.05
            assert beta.std() > 0.01 and np.abs(beta).max() < 1.0
            assert (var > 0).all() and not np.allclose(var, 1.0) and var.std() > 0
            assert not np.allclose(mean, 0.0)
            assert node.input[4].endswith(".running_var")


def test_torch_like_names_and_layout():
    r18 = ref.build_resnet18(input_size=32, **SMALL)
    inits = _inits(r18)
    nodes = {n.name: n for n in r18.graph.node}
    for w in ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.running_mean",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "fc.weight",
              "fc.bias"]:
        assert w in inits, w
    assert "layer1.0.conv1.bias" not in inits                  # conv before BN: no bias
    assert nodes["layer1.0.conv1"].op_type == "Conv"
    fc = nodes["fc"]
    assert fc.op_type == "Gemm" and {a.name: a.i for a in fc.attribute if a.name == "transB"} \
        == {"transB": 1}
    assert inits["fc.weight"].shape == (10, 128)               # torch Linear layout [out, in]

    vgg = _inits(ref.build_vgg16(input_size=32, **SMALL))
    assert "features.0.bias" in vgg and "features.1.running_mean" in vgg  # vgg16_bn: bias + BN
    ops = lambda m: {n.op_type for n in m.graph.node}  # noqa: E731
    assert "Clip" in ops(ref.build_mobilenetv2(input_size=32, **SMALL))
    assert "Concat" in ops(ref.build_squeezenet11(input_size=32, **SMALL))
    se = ref.build_senet_small(input_size=32, **SMALL)
    assert {"HardSigmoid", "HardSwish", "Mul", "GlobalAveragePool", "Add"} <= ops(se)
    se_inits = _inits(se)
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 and
               a.i == se_inits[n.input[1]].shape[0] for a in n.attribute) for n in se.graph.node)


def test_width_rounding_and_flatten_size():
    m = _inits(ref.build_mobilenetv2(width=0.35, input_size=32, **{"num_classes": 10}))
    assert all(v.shape[0] % 8 == 0 for k, v in m.items() if k.endswith(".weight") and v.ndim == 4)
    # VGG at 64: 5 pools -> 2x2 map, the first FC follows the real feature map.
    vgg = _inits(ref.build_vgg16(input_size=64, **SMALL))
    assert vgg["classifier.0.weight"].shape == (1024, 128 * 2 * 2)
    # AlexNet at 64 and 32 work; 224 uses the 6x6 map (9216 at width 1).
    assert _inits(ref.build_alexnet(input_size=64, **SMALL))["classifier.1.weight"].shape[1] == 64
    # VGG at 448: 14x14 map -> exact AdaptiveAvgPool(7) as AveragePool k2, then 7*7*C.
    big = ref.build_vgg16(width=0.125, input_size=448, num_classes=10)
    assert "AveragePool" in {n.op_type for n in big.graph.node}
    assert _inits(big)["classifier.0.weight"].shape == (512, 64 * 7 * 7)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ref.build_resnet18(width=0)
    with pytest.raises(ValueError):
        ref.build_resnet18(input_size=8)


def test_cli_writes_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = ref.main(["squeezenet11", str(out), "--width", "0.25", "--input-size", "32",
                   "--classes", "7", "--seed", "3"])
    assert rc == 0 and "parameters" in capsys.readouterr().out
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    expected = ref.build_squeezenet11(width=0.25, input_size=32, num_classes=7, seed=3)
    assert model.SerializeToString() == expected.SerializeToString()


def test_resnet20_cifar_option_a_shortcut():
    """He et al.'s CIFAR ResNet-20: 269,722 parameters at width 1 with 10 classes (conv 3x3 stem,
    3 x 3 basic blocks of 16/32/64 channels, FC); the two downsampling shortcuts are parameter-free
    Slice(::2 on H, W) -> Pad(channel axis) as torch exports them."""
    assert ref.expected_param_count("resnet20_cifar", input_size=32, num_classes=10) == 269_722
    model = ref.build("resnet20_cifar", input_size=32, num_classes=10)
    assert ref.count_parameters(model) == 269_722
    inits = _inits(model)
    pads = {n.name: inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Pad"}
    assert pads == {"layer2.0.shortcut.pad": [0, 8, 0, 0, 0, 8, 0, 0], "layer3.0.shortcut.pad": [0, 16, 0, 0, 0, 16, 0, 0]}
    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    assert [inits[n.input[3]].tolist() for n in slices] == [[2, 3]] * 2
    assert [inits[n.input[4]].tolist() for n in slices] == [[2, 2]] * 2
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert _run(model, x).shape == (2, 10)
