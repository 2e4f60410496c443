"""The torch.library surface: schemas, fake implementations (opcheck, torch.export,
torch.compile), argument validation, the dispatch policy, and the sm_90 compile check."""
import os

os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import qpasses.kernels  # noqa: E402,F401  (registers the ops)
from qpasses.kernels import library as ops  # noqa: E402
from qpasses.kernels import packing as P  # noqa: E402
from qpasses.kernels import reference as R  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_SCHEMAS = {
    "int8_linear": 'qpasses::int8_linear(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, '
                   'str activation="none", ScalarType out_dtype=6, int x_zp=0) -> Tensor',
    "int8_linear_requant": "qpasses::int8_linear_requant(Tensor x_q, int x_zp, Tensor w_q, Tensor? bias_int32, "
                           "Tensor M0, Tensor shift, int out_zp=0, int qmin=-128, int qmax=127) -> Tensor",
    "int8_conv2d": 'qpasses::int8_conv2d(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, '
                   'int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, str activation="none", '
                   'ScalarType out_dtype=6, int x_zp=0) -> Tensor',
    "int8_conv2d_requant": "qpasses::int8_conv2d_requant(Tensor x_q, int x_zp, Tensor w_q, Tensor? bias_int32, "
                           "Tensor M0, Tensor shift, int out_zp=0, int qmin=-128, int qmax=127, int[2] stride=1, "
                           "int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor",
    "dynamic_int8_linear": "qpasses::dynamic_int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, "
                           "int a_bits=8, bool symmetric=False, bool per_token=True, ScalarType? out_dtype=None) "
                           "-> Tensor",
    "int4_weight_only_linear": "qpasses::int4_weight_only_linear(Tensor x, Tensor w_packed, Tensor scales, "
                               "Tensor? zeros, int group_size, Tensor? bias=None) -> Tensor",
    "binary_linear": "qpasses::binary_linear(Tensor x, Tensor w_packed, int K, Tensor? alpha=None, "
                     "Tensor? bias=None, bool x_packed=False) -> Tensor",
}


def test_schemas():
    for name, schema in EXPECTED_SCHEMAS.items():
        assert str(getattr(torch.ops.qpasses, name).default._schema) == schema


def _cases():
    g = torch.Generator().manual_seed(0)
    i8 = lambda *s: torch.randint(-128, 128, s, dtype=torch.int8, generator=g)  # noqa: E731
    x, w = i8(3, 37), i8(5, 37)
    wp = P.pack_int8_weight(w)
    M0, sh = R.quantize_multipliers([1e-3] * 5)
    xc, wc = i8(1, 4, 5, 6), i8(6, 2, 3, 3)
    M0c, shc = R.quantize_multipliers([2e-3] * 6)
    w4, s4, z4 = P.quantize_int4(torch.randn(5, 37, generator=g), 32, symmetric=False)
    wb = P.pack_bits(torch.randn(5, 37, generator=g))
    xb = P.pack_bits(torch.randn(3, 37, generator=g))
    return [
        ("int8_linear", (x, torch.rand(3), wp, torch.rand(5), torch.randn(5), "relu", torch.bfloat16)),
        ("int8_linear", (x, torch.rand(1), wp, torch.rand(5), None, "none", torch.float32, -17)),
        ("int8_linear_requant", (x, 3, wp, torch.randint(-9, 9, (5,), dtype=torch.int32), M0, sh, -1, -128, 127)),
        ("int8_conv2d", (xc, torch.tensor([0.1]), P.pack_int8_conv_weight(wc), torch.rand(6), None, [1, 2], [1, 1],
                         [1, 1], 2, "relu6", torch.float16)),
        ("int8_conv2d_requant", (xc, -4, wc, None, M0c, shc, 2, -128, 127, [1, 1], [1, 0], [1, 1], 2)),
        ("dynamic_int8_linear", (torch.randn(2, 3, 37, generator=g), wp, torch.rand(5), torch.randn(5), 8, False,
                                 True, None)),
        ("dynamic_int8_linear", (torch.randn(3, 37, generator=g), wp, torch.rand(1), None, 5, True, False,
                                 torch.bfloat16)),
        ("int4_weight_only_linear", (torch.randn(3, 37, generator=g).to(torch.bfloat16), w4, s4, z4, 32,
                                     torch.randn(5))),
        ("binary_linear", (i8(3, 37), wb, 37, torch.rand(5), None, False)),
        ("binary_linear", (xb, wb, 37, None, None, True)),
    ]


CASES = _cases()


@pytest.mark.parametrize("policy", ["never", "always"])
@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_opcheck(idx, policy, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, args = CASES[idx]
    with ops.triton_policy(policy):
        torch.library.opcheck(getattr(torch.ops.qpasses, name).default, args)


@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_triton_and_reference_agree(idx, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, args = CASES[idx]
    op = getattr(torch.ops.qpasses, name)
    with ops.triton_policy("never"):
        ref = op(*args)
    with ops.triton_policy("always"):
        tri = op(*args)
    assert tri.dtype == ref.dtype and tri.shape == ref.shape and tri.stride() == ref.stride()
    if tri.is_floating_point():
        torch.testing.assert_close(tri.float(), ref.float(), rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(tri, ref)


class TinyQuantNet(torch.nn.Module):
    """conv (requant, int8 out) -> int8 linear (float out) -> int4 linear -> binary linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("wc", P.pack_int8_conv_weight(torch.randint(-128, 128, (4, 3, 3, 3), dtype=torch.int8,
                                                                         generator=g)))
        m0, sh = R.quantize_multipliers([2e-3] * 4)
        self.register_buffer("m0", m0)
        self.register_buffer("sh", sh)
        self.register_buffer("wl", P.pack_int8_weight(torch.randint(-128, 128, (6, 64), dtype=torch.int8,
                                                                    generator=g)))
        self.register_buffer("ws", torch.rand(6, generator=g) * 1e-2)
        w4, s4, _ = P.quantize_int4(torch.randn(5, 6, generator=g), 32)
        self.register_buffer("w4", w4)
        self.register_buffer("s4", s4)
        self.register_buffer("wb", P.pack_bits(torch.randn(3, 5, generator=g)))

    def forward(self, x):                                  # x: fp32 [B, 3, 4, 4]
        xq = torch.clamp(torch.round(x / 0.05), -128, 127).to(torch.int8)
        y = torch.ops.qpasses.int8_conv2d_requant(xq, 0, self.wc, None, self.m0, self.sh, -128, -128, 127,
                                                  [1, 1], [1, 1], [1, 1], 1)
        y = y.permute(0, 2, 3, 1).reshape(y.shape[0], -1)  # [B, 64] int8
        y = torch.ops.qpasses.int8_linear(y, torch.tensor([0.05]), self.wl, self.ws, None, "relu", torch.float32)
        y = torch.ops.qpasses.int4_weight_only_linear(y, self.w4, self.s4, None, 32, None)
        yb = torch.where(y < 0, -1, 1).to(torch.int8)
        return torch.ops.qpasses.binary_linear(yb, self.wb, 5, None, None, False)


def test_torch_export_keeps_the_ops():
    model = TinyQuantNet()
    x = torch.randn(2, 3, 4, 4)
    with ops.triton_policy("never"):
        want = model(x)
        batch = torch.export.Dim("batch", min=1, max=64)
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
        for name in ["int8_conv2d_requant", "int8_linear", "int4_weight_only_linear", "binary_linear"]:
            assert getattr(torch.ops.qpasses, name).default in targets
        assert torch.equal(ep.module()(x), want)
        x5 = torch.randn(5, 3, 4, 4)
        assert torch.equal(ep.module()(x5), model(x5))


def test_torch_compile_fullgraph():
    model = TinyQuantNet()
    x = torch.randn(3, 3, 4, 4)
    with ops.triton_policy("never"):
        want = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), want)


def test_validation_errors():
    x = torch.zeros(2, 8, dtype=torch.int8)
    w = P.pack_int8_weight(torch.zeros(3, 8, dtype=torch.int8))
    one = torch.ones(1)
    lin = torch.ops.qpasses.int8_linear
    with pytest.raises(ValueError, match="int8"):
        lin(x.float(), one, w, one, None, "none", torch.float32)
    with pytest.raises(ValueError, match="activation"):
        lin(x, one, w, one, None, "gelu", torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        lin(x, one, w, one, None, "none", torch.int32)
    with pytest.raises(ValueError, match="w_scale"):
        lin(x, one, w, torch.ones(2), None, "none", torch.float32)
    with pytest.raises(ValueError, match="columns"):
        lin(torch.zeros(2, 20, dtype=torch.int8), one, w, one, None, "none", torch.float32)
    with pytest.raises(ValueError, match="qmin"):
        torch.ops.qpasses.int8_linear_requant(x, 0, w, None, torch.tensor([1 << 30]), torch.tensor([3]), 0, 5, 4)
    with pytest.raises(ValueError, match="groups"):
        torch.ops.qpasses.int8_conv2d(torch.zeros(1, 3, 4, 4, dtype=torch.int8), one,
                                      torch.zeros(4, 3, 1, 1, dtype=torch.int8), one, None, groups=2)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.qpasses.int4_weight_only_linear(torch.zeros(1, 64), torch.zeros(2, 32, dtype=torch.uint8),
                                                  torch.ones(2, 1), None, 48, None)
    with pytest.raises(ValueError, match="words"):
        torch.ops.qpasses.binary_linear(torch.zeros(1, 40, dtype=torch.int8), torch.zeros(2, 1, dtype=torch.int32), 40)
    with pytest.raises(ValueError, match="overflow"):
        lin(torch.zeros(1, ops.MAX_K_INT8 + 1, dtype=torch.int8), one,
            torch.zeros(1, ops.MAX_K_INT8 + 1, dtype=torch.int8), one, None, "none", torch.float32)


def test_dispatch_policy(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("QPASSES_TRITON", raising=False)
    assert not ops.use_triton(cpu)                         # auto: reference on CPU
    monkeypatch.setenv("QPASSES_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.use_triton(cpu)
    with ops.triton_policy("never"):
        assert not ops.use_triton(cpu)
        assert not ops.use_triton(torch.device("cuda"))
    monkeypatch.setenv("QPASSES_TRITON", "auto")
    assert ops.use_triton(torch.device("cuda")) == ops.triton_available()


def test_kernel_modules_follow_the_interpreter_setting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops._kmod("triton_binary").INTERPRET         # rebuilt as compiled (GPU) kernels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = ops._kmod("triton_binary")
    assert mod.INTERPRET and ops._kmod("triton_int8").INTERPRET


def _compile_check(quick):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--compile-check"] + (["--quick"] if quick else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def _ptxas_available():
    try:
        import triton
        return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton without the NVIDIA backend tools")
def test_kernels_compile_for_sm90_quick():
    """One variant of every kernel compiles to an sm_90 cubin (no GPU needed) within shared memory."""
    res = _compile_check(quick=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton without the NVIDIA backend tools")
@pytest.mark.skipif(not os.environ.get("QPASSES_COMPILE_CHECK_ALL"),
                    reason="~4 min on 2 CPU cores without a Triton cache (> the 2 min slow-test budget): set "
                           "QPASSES_COMPILE_CHECK_ALL=1, or run `python benchmarks/kernels.py --compile-check`")
def test_kernels_compile_for_sm90_all_autotune_configs():
    res = _compile_check(quick=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAIL" not in res.stdout
