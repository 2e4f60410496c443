"""Tests for the reference models in :mod:`qpasses.zoo`."""

import operator
import time

import pytest
import torch
import torch.fx
import torch.nn as nn

from qpasses import zoo

EXPECTED_OUT = {
    "resnet": (2, 10),
    "mobilenetv2": (2, 10),
    "mlp": (2, 10),
    "transformer": (2, 16, 64),
    "digits_cnn": (2, 10),
}

FX_TRACEABLE = ["resnet", "mobilenetv2", "mlp", "digits_cnn"]
BN_MODELS = ["resnet", "mobilenetv2", "digits_cnn"]


def _build(name):
    torch.manual_seed(0)
    return zoo.MODELS[name]().eval()


def test_registry_names():
    assert set(zoo.MODELS) == set(EXPECTED_OUT)


@pytest.mark.parametrize("name", sorted(EXPECTED_OUT))
def test_forward_shape(name):
    model = _build(name)
    x = zoo.example_input(name)
    with torch.no_grad():
        out = model(x)
    assert tuple(out.shape) == EXPECTED_OUT[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("batch", [1, 5])
def test_example_input_batch_and_determinism(batch):
    a = zoo.example_input("resnet", batch=batch)
    state = torch.random.get_rng_state()
    b = zoo.example_input("resnet", batch=batch)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert a.shape == (batch, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(zoo.example_input("resnet", seed=1), zoo.example_input("resnet", seed=0))


def test_example_input_unknown():
    with pytest.raises(KeyError):
        zoo.example_input("nope")


@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_models_have_batchnorm(name):
    model = _build(name)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", FX_TRACEABLE)
def test_fx_traceable_models_match_eager(name):
    model = _build(name)
    x = zoo.example_input(name)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def _count_adds(gm):
    return sum(
        1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)
    )


def test_resnet_structure():
    model = _build("resnet")
    gm = torch.fx.symbolic_trace(model)
    assert _count_adds(gm) == 4  # one residual add per BasicBlock, blocks=(2, 2)
    downs = [m for m in model.modules() if isinstance(m, zoo.BasicBlock) and m.downsample is not None]
    assert len(downs) == 1
    conv, bn = downs[0].downsample
    assert conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and isinstance(model.fc, nn.Linear)


def test_resnet_configurable():
    model = zoo.ResNetLike(num_classes=3, in_ch=3, width=8, blocks=(1, 1, 1)).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_mobilenetv2_structure():
    model = _build("mobilenetv2")
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert any(m.stride == (2, 2) for m in dw)
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    gm = torch.fx.symbolic_trace(model)
    assert _count_adds(gm) == 2  # the two stride-1, same-channel blocks
    blocks = [m for m in model.modules() if isinstance(m, zoo.InvertedResidual)]
    assert [b.use_residual for b in blocks] == [True, False, True]


def test_mlp_flattens_and_is_configurable():
    model = zoo.MLP(in_features=12, hidden=(7,), num_classes=4)
    assert model(torch.randn(3, 3, 4)).shape == (3, 4)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1


# --------------------------------------------------------------------------- transformer


def test_transformer_not_fx_traceable():
    model = _build("transformer")
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)


def test_transformer_exportable_and_matches_eager():
    model = _build("transformer")
    x = zoo.example_input("transformer")
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))
    targets = {n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.softmax.int in targets or torch.ops.aten._softmax.default in targets
    assert torch.ops.aten.layer_norm.default in targets or torch.ops.aten.native_layer_norm.default in targets


def test_transformer_structure():
    model = _build("transformer")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert isinstance(getattr(model, name), nn.Linear)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2
    assert any(isinstance(m, nn.GELU) for m in model.modules())


def test_transformer_mask_and_causal():
    torch.manual_seed(0)
    model = zoo.TransformerEncoderBlock(d_model=16, nhead=2, dim_ff=32, seq_len=8).eval()
    x = torch.randn(2, 5, 16)
    full = model(x)
    # An all-ones mask is the same as no mask.
    torch.testing.assert_close(model(x, torch.ones(2, 5)), full)
    # Masking the last two tokens: the outputs of the first three tokens equal
    # those of the truncated sequence.
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2)
    torch.testing.assert_close(model(x, mask)[:, :3], model(x[:, :3]), atol=1e-5, rtol=1e-5)
    # The caller's mask is not modified, even with a masked first token.
    m0 = torch.zeros(2, 5)
    model(x, m0)
    assert torch.equal(m0, torch.zeros(2, 5))
    # Causal: token i only depends on tokens <= i.
    causal = zoo.TransformerEncoderBlock(d_model=16, nhead=2, dim_ff=32, seq_len=8, causal=True).eval()
    causal.load_state_dict(model.state_dict())
    torch.testing.assert_close(causal(x)[:, :3], causal(x[:, :3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model(torch.randn(1, 9, 16))
    with pytest.raises(ValueError):
        zoo.TransformerEncoderBlock(d_model=10, nhead=4)


def test_transformer_classifier():
    torch.manual_seed(0)
    model = zoo.TransformerClassifier().eval()
    x = zoo.example_input("transformer_classifier", batch=3)
    assert model(x).shape == (3, 10)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x))


# --------------------------------------------------------------------------- conv-BN chains


def test_chain_nodes_per_block():
    per_block, fixed = zoo.chain_nodes_per_block()
    assert (per_block, fixed) == (7, 2)


@pytest.mark.parametrize("target", [350, 1400, 2800])
def test_chain_for_nodes(target):
    model = zoo.chain_for_nodes(target)
    n = len(torch.fx.symbolic_trace(model).graph.nodes)
    assert abs(n - target) <= 0.15 * target


def test_conv_bn_chain_forward_and_structure():
    torch.manual_seed(0)
    model = zoo.conv_bn_chain(3, channels=4).eval()
    assert len(model.blocks) == 3
    x = zoo.example_input("conv_bn_chain")[:, :4]
    assert model(x).shape == x.shape
    gm = torch.fx.symbolic_trace(model)
    ops = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert len(ops) == 21
    assert _count_adds(gm) == 3
    torch.testing.assert_close(gm(x), model(x))
    x8 = zoo.example_input("conv_bn_chain")
    assert zoo.conv_bn_chain(2)(x8).shape == x8.shape
    with pytest.raises(ValueError):
        zoo.conv_bn_chain(0)


@pytest.mark.slow
def test_chain_100k_nodes_builds_fast():
    t0 = time.perf_counter()
    model = zoo.chain_for_nodes(100_000)
    elapsed = time.perf_counter() - t0
    per_block, fixed = zoo.chain_nodes_per_block()
    assert abs(fixed + per_block * len(model.blocks) - 100_000) <= per_block
    assert elapsed < 60, f"building a 100k-node chain took {elapsed:.1f}s"
