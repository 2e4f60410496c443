"""Front-end on real-model idioms: constant non-tensor arguments, dynamic batch / sequence
dimensions of export graphs, metadata asserts and no-op ``to`` nodes, extra tensor inputs,
and the op classes of GPT-2's ``Conv1D`` (``addmm``) and friends.

HF transformers models are built from small configs (no download).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses.opclasses import classify
from qpasses.qnodes import quantizer_module

transformers = pytest.importorskip("transformers")


class Flagged(nn.Module):
    """``forward(x, embed=False)``: a defaulted flag, as HF ``output_attentions`` & co."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x, embed=False, mask=None):
        y = self.l(x)
        if mask is not None:
            y = y * mask
        return y * 2 if embed else y


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("mode", ["auto", "fx", "export"])
def test_defaulted_flag_traces_to_one_input(mode):
    m = Flagged()
    x = torch.randn(2, 8)
    gm = qpasses.trace(m, x, mode=mode)
    assert [n.name for n in _placeholders(gm)] == ["x"]
    assert not any("assert" in t or t.endswith("eq") for t in _targets(gm)), _targets(gm)
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_specialised_non_tensor_inputs_are_constants(mode):
    m = Flagged()
    x, mask = torch.randn(2, 8), torch.rand(2, 8)
    gm = qpasses.trace(m, (x, True), mode=mode)
    assert len(_placeholders(gm)) == 1
    torch.testing.assert_close(gm(x), m(x, True))
    # a None between tensors: the graph takes the two tensors, in order
    gm = qpasses.trace(m, (x, None, mask), mode=mode)
    assert [n.name for n in _placeholders(gm)] == ["x", "mask"]
    assert gm.meta["qpasses.example_inputs"][1] is mask
    torch.testing.assert_close(gm(x, mask), m(x, None, mask))


def test_defaulted_flag_quantizes_and_runs_genie_shape():
    """The one-input graph goes through a recipe and takes one input afterwards."""
    m = Flagged().eval()
    x = torch.randn(4, 8)
    gm = qpasses.trace(m, x)
    q = qpasses.PassManager("ptq_int8").run(gm, data=[torch.randn(4, 8) for _ in range(2)])
    assert len(_placeholders(q)) == 1
    assert q(x).shape == (4, 8)


def test_export_dynamic_batch_and_sequence_detected():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.l = nn.Linear(16, 16)

        def forward(self, ids):
            h = self.emb(ids)
            return self.l(h).view(ids.shape[0], ids.shape[1], 16)

    gm = qpasses.trace(Seq(), torch.randint(0, 50, (2, 6)), mode="export")
    assert gm.meta["qpasses.dynamic_dims"] == {"ids": [0, 1]}
    assert gm(torch.randint(0, 50, (3, 11))).shape == (3, 11, 16)


def test_dynamic_declared_and_static():
    m = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(2, 5, 8)
    gm = qpasses.trace(m, x, mode="export", dynamic=False)
    assert gm.meta["qpasses.dynamic_dims"] == {next(iter(gm.meta["qpasses.dynamic_dims"])): []}
    gm = qpasses.trace(m, x, mode="export", dynamic=([0],))
    assert list(gm.meta["qpasses.dynamic_dims"].values()) == [[0]]
    assert gm(torch.randn(3, 5, 8)).shape == (3, 5, 8)
    with pytest.raises(Exception):
        gm(torch.randn(3, 6, 8))   # the sequence is static: export's guard says so
    with pytest.raises(qpasses.TraceError):
        qpasses.trace(m, x, mode="export", dynamic={"nope": [0]})


def test_export_graph_loses_metadata_asserts_and_noop_to():
    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x).to(torch.float32)      # same dtype: a no-op
            return self.b(h.to(x.device)), h.to(torch.float64)

    m = Casts()
    gm = qpasses.trace(m, torch.randn(2, 8), mode="export")
    t = _targets(gm)
    assert "aten._assert_tensor_metadata.default" not in t
    tos = [n for n in gm.graph.nodes if n.op == "call_function" and "aten.to" in str(n.target)]
    assert len(tos) == 1 and tos[0].meta["val"].dtype == torch.float64   # the real conversion stays
    x = torch.randn(3, 8)
    for a, b in zip(gm(x), m(x)):
        torch.testing.assert_close(a, b)


def _bert(layers=1):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_hf_models_need_export():
    """symbolic_trace fails on HF models; ``trace`` says why and goes to torch.export."""
    m = _bert()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(qpasses.TraceError):
        qpasses.trace(m, ids, mode="fx")
    gm = qpasses.trace(m, ids)
    assert gm.meta["qpasses.level"] == "aten"


def test_bert_calibrates_on_other_lengths():
    """Done-when: a BERT encoder traced on length 8 calibrates on sentences of 5, 11 and 16
    tokens (with attention masks) and runs on a length it has not seen."""
    m = _bert()
    ids = torch.randint(0, 100, (2, 8))
    gm = qpasses.trace(m, (ids, torch.ones_like(ids)))
    assert gm.meta["qpasses.dynamic_dims"] == {"input_ids": [0, 1], "attention_mask": [0, 1]}
    g = torch.Generator().manual_seed(1)
    data = []
    for L in (5, 11, 16):
        mask = torch.ones(3, L, dtype=torch.long)
        mask[0, L // 2:] = 0                      # a padded sentence
        data.append((torch.randint(0, 100, (3, L), generator=g), mask))
    pm = qpasses.PassManager("ptq_int8")
    q = pm.run(gm, data=data)
    ids13 = torch.randint(0, 100, (4, 13), generator=g)
    mask13 = torch.ones_like(ids13)
    out = q(ids13, mask13).last_hidden_state
    ref = m(ids13, mask13).last_hidden_state
    assert out.shape == (4, 13, 32)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    assert pm.report["observe_weighted_inputs"].rewrites == 7   # q, k, v, o, ffn in, ffn out, pooler


def test_extra_tensor_inputs_position_ids():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    gm = qpasses.trace(m, (ids, torch.ones_like(ids), pos))
    assert [n.name for n in _placeholders(gm)] == ["input_ids", "attention_mask", "position_ids"]
    ids2 = torch.randint(0, 100, (3, 5))
    pos2 = torch.arange(5).expand(3, 5)
    torch.testing.assert_close(gm(ids2, torch.ones_like(ids2), pos2).logits,
                               m(ids2, torch.ones_like(ids2), pos2).logits)


# ------------------------------------------------------------------ op coverage: Conv1D & friends
def _gpt2(layers=2):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=100, n_positions=32, use_cache=False)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("recipe", ["ptq_int8", "dynamic_int8", "w4a16"])
def test_gpt2_conv1d_all_projections_quantized(recipe):
    """Done-when: GPT-2 reports 9/9 -- per layer attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    (Conv1D: addmm with an [in, out] weight), two layers, plus the lm_head linear."""
    m = _gpt2()
    gm = qpasses.trace(m, torch.randint(0, 100, (2, 8)))
    data = [torch.randint(0, 100, (2, L)) for L in (6, 12)]
    pm = qpasses.PassManager(recipe, **({"group_size": 32} if recipe == "w4a16" else {}))
    q = pm.run(gm, data=data)
    cov = pm.report.coverage_of(q)
    assert cov.line() == "quantized 9/9 weighted ops", cov.line()
    assert "coverage: quantized 9/9 weighted ops" in str(pm.report)
    assert pm.report["addmm_as_linear"].rewrites == 8
    out, ref = q(data[1]).logits, m(data[1]).logits
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > (0.99 if recipe == "w4a16" else 0.999)


def test_conv1d_weight_axis_is_out_dim():
    """The [in, out] weight's per-channel scales run along its out dim (dim 1): one per output."""
    from qpasses.numerics import FakeQuantize
    m = _gpt2(layers=1)
    q = qpasses.PassManager("ptq_int8").run(qpasses.trace(m, torch.randint(0, 100, (2, 8))),
                                           data=[torch.randint(0, 100, (2, 8))])
    mods = dict(q.named_modules())
    lin = [n for n in q.graph.nodes if classify(n, mods) == "linear" and "qpasses.transposed_from" in n.meta]
    c_fc = next(n for n in lin if "c_fc" in n.meta["qpasses.transposed_from"])
    fq = quantizer_module(mods, c_fc.args[1])
    assert isinstance(fq, FakeQuantize) and fq.axis == 0 and fq.scale.numel() == 128   # c_fc: [32, 128]
    w_t = fq(getattr(q, c_fc.args[1].args[0].target))
    torch.testing.assert_close(w_t.t(), m.transformer.h[0].mlp.c_fc.weight, atol=fq.scale.max().item(), rtol=0)


def test_report_names_float_weighted_ops():
    m = _gpt2(layers=1)
    gm = qpasses.trace(m, torch.randint(0, 100, (2, 8)))
    pm = qpasses.PassManager("ptq_int8", skip=["*c_fc*"])
    q = pm.run(gm, data=[torch.randint(0, 100, (2, 8))])
    cov = pm.report.coverage_of(q)
    assert cov.total == 5 and len(cov.missing) == 1 and "skip pattern" in cov.missing[0][2]
    # a run without canonicalize leaves the addmm products in float, and says so
    pm = qpasses.PassManager("observe")
    cov = pm.report.coverage_of(pm.run(gm))
    assert [c for _, c, _ in cov.missing].count("addmm") == 4 and all(r for *_, r in cov.missing)


def test_op_classes_of_real_model_spellings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))
            self.b = nn.Parameter(torch.randn(4))
            self.gn = nn.GroupNorm(2, 4)
            self.c1 = nn.Conv1d(4, 4, 3)
            self.ct = nn.ConvTranspose2d(4, 4, 2)
            self.c3 = nn.Conv3d(4, 4, 1)
            self.rms = nn.RMSNorm(4)
            self.register_buffer("m2", torch.ones(3, 4, 4))

        def forward(self, x):
            y = torch.addmm(self.b, x, self.w)
            z = self.gn(self.c1(F.pad(y[:, :, None], (1, 1))))
            q = z.transpose(1, 2)[:, None]
            a = F.scaled_dot_product_attention(q, q, q)
            im = self.ct(F.interpolate(a.reshape(-1, 4, 1, 1), scale_factor=2.0))
            v = self.c3(im[:, :, None])
            return self.rms(v.mean((2, 3, 4))) + torch.baddbmm(y[:, None], y[:, None], self.m2)[:, 0] + x @ self.w

    want = {"addmm", "pad", "conv1d", "group_norm", "scaled_dot_product_attention", "interpolate",
            "conv_transpose2d", "conv3d", "rms_norm", "baddbmm", "matmul"}
    m = M().eval()
    x = torch.randn(3, 8)
    for mode in ("fx", "export"):
        gm = qpasses.trace(m, x, mode=mode, dynamic=False)
        mods = dict(gm.named_modules())
        assert want <= {classify(n, mods) for n in gm.graph.nodes}, mode
        pm = qpasses.PassManager("ptq_int8")
        q = pm.run(gm, data=[x])
        assert pm.report["addmm_as_linear"].rewrites == 1 and pm.report["matmul_weight_as_linear"].rewrites == 1
        assert pm.report.coverage_of(q).complete, pm.report.coverage.line()
        assert F.cosine_similarity(q(x).flatten(), m(x).flatten(), dim=0) > 0.99
