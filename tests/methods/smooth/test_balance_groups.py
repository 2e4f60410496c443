"""Layer groups for SmoothQuant / AWQ found from the graph's structure (qpasses.methods.smooth.balance).

The expected groups are written from the architectures (which layer feeds which), per layer, and
compared with what the graph analysis finds; names in the graph are only used to say which
module a node belongs to (``nn_module_stack``), never by the code under test.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import qpasses
from qpasses.methods.smooth.balance import find_groups

transformers = pytest.importorskip("transformers")
T = transformers


def _module_path(node) -> str:
    """The source module of a node (export: innermost nn_module_stack entry; fx: the target)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _short(path: str) -> str:
    """'model.layers.0.self_attn.q_proj' -> 'layers.0.q_proj' (layer index + last name)."""
    parts = path.split(".")
    idx = [p for p in parts if p.isdigit()]
    return (f"{idx[-1]}." if idx else "") + parts[-1]


def _text_data(vocab=100, two_inputs=True):
    g = torch.Generator().manual_seed(0)
    out = []
    for L in (12, 8, 16):
        ids = torch.randint(0, vocab, (2, L), generator=g)
        out.append((ids, torch.ones_like(ids)) if two_inputs else (ids,))
    return out


@functools.lru_cache(maxsize=None)
def _model(name: str):
    torch.manual_seed(0)
    if name == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                             use_cache=False, max_position_embeddings=32))
    elif name == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                             use_cache=False, max_position_embeddings=32))
    elif name == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                           use_cache=False))
    elif name == "bert":
        m = T.BertModel(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                     vocab_size=100, max_position_embeddings=32), add_pooling_layer=False)
    elif name == "opt":
        m = T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                                         vocab_size=100, use_cache=False, max_position_embeddings=32,
                                         word_embed_proj_dim=64))
    else:
        raise KeyError(name)
    data = _text_data(two_inputs=name != "gpt2")
    gm = qpasses.PassManager("canonicalize").run(qpasses.trace(m.eval(), data[0]))
    return m.eval(), gm, data


def _groups(name, scale_nodes=False):
    _, gm, data = _model(name)
    groups, refused = find_groups(gm, data[0], scale_nodes=scale_nodes)
    got = set()
    for g in groups:
        prod = _short(_module_path(g.producer)) if g.kind != "scale_node" else f"<{g.producer.name}>"
        got.add((prod, frozenset(_short(_module_path(c.node)) for c in g.consumers), g.kind))
    return got, groups, refused


def _expected(layers, per_layer):
    out = set()
    for i in range(layers):
        for prod, cons, kind in per_layer:
            out.add((f"{i}.{prod}", frozenset(f"{i}.{c}" for c in cons), kind))
    return out


@pytest.mark.slow
def test_rms_norm_fused_in_llama_export_graph():
    _, gm, data = _model("llama")
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.rms_norm.default]
    assert len(norms) == 5                                            # 2 layers x 2 + the final norm
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.rsqrt.default]
    m = _model("llama")[0]
    pm = qpasses.PassManager("canonicalize", verify=True, quiet=True)
    pm.run(qpasses.trace(m, data[0]), data=data)
    assert pm.report["fuse_rms_norm"].rewrites == 5
    assert pm.report.verify[0]["value"] < 1e-5                           # the fused op computes the same


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llama_family_groups(name):
    got, groups, _ = _groups(name)
    want = _expected(2, [
        ("input_layernorm", ("q_proj", "k_proj", "v_proj"), "norm"),
        ("post_attention_layernorm", ("gate_proj", "up_proj"), "norm"),
        ("v_proj", ("o_proj",), "linear"),
        ("up_proj", ("down_proj",), "linear"),
    ])
    want.add(("norm", frozenset({"lm_head"}), "norm"))                   # final norm -> lm_head
    assert got == want
    # grouped-query attention: o_proj's 64 input columns map onto v_proj's 32 rows, each twice
    vo = [g for g in groups if _short(_module_path(g.producer)).endswith("v_proj")][0]
    cols = vo.consumers[0].channels
    assert vo.size == 32 and cols.numel() == 64
    assert torch.equal(torch.bincount(cols, minlength=32), torch.full((32,), 2))
    # head h of o reads kv head h // 2: columns 16h..16h+15 come from rows 16(h//2)..
    for h in range(4):
        assert torch.equal(cols[16 * h:16 * (h + 1)], torch.arange(16) + 16 * (h // 2))


@pytest.mark.slow
def test_gpt2_groups():
    got, groups, _ = _groups("gpt2")
    want = _expected(2, [("ln_1", ("c_attn",), "norm"), ("ln_2", ("c_fc",), "norm"),
                         ("c_attn", ("c_proj",), "linear")])
    want.add(("ln_f", frozenset({"lm_head"}), "norm"))
    # attention's c_proj and the MLP's c_proj share a name: the MLP one (after GELU) is in no group
    assert got == want
    for g in groups:
        if g.kind == "linear":      # only the value third of c_attn's 192 outputs is scaled
            assert g.size == 192 and torch.equal(g.scaled, torch.arange(128, 192))
            assert torch.equal(g.consumers[0].channels, torch.arange(128, 192))


@pytest.mark.slow
def test_opt_groups():
    got, _, _ = _groups("opt")
    want = _expected(2, [("self_attn_layer_norm", ("q_proj", "k_proj", "v_proj"), "norm"),
                         ("final_layer_norm", ("fc1",), "norm"),
                         ("v_proj", ("out_proj",), "linear"),
                         ("fc1", ("fc2",), "linear")])                 # linear -> ReLU -> linear
    want.add(("final_layer_norm", frozenset({"lm_head"}), "norm"))      # the decoder's final norm
    assert got == want


@pytest.mark.slow
def test_bert_post_ln_groups_and_reasons():
    got, _, refused = _groups("bert")
    assert got == _expected(2, [("value", ("dense",), "linear")])        # attention output <- v
    reasons = [r.reason for r in refused]
    # post-LN: the embeddings' LayerNorm, both of layer 0 and the attention one of layer 1 also
    # feed a residual add (layer 1's last one is the graph output)
    assert sum("is not exact" in r and "(add)" in r for r in reasons) == 4
    assert sum("(gelu)" in r for r in reasons) == 2                      # intermediate -> GELU -> output
    got, _, _ = _groups("bert", scale_nodes=True)
    nodes = {(p, c) for p, c, k in got if k == "scale_node"}
    # with scale nodes: q/k/v behind each LN, the intermediate dense, the output dense after GELU
    assert len(nodes) == 3 * 2
    assert {c for _, c in nodes} == {frozenset({f"{i}.query", f"{i}.key", f"{i}.value"}) for i in range(2)} | \
        {frozenset({f"{i}.dense"}) for i in range(2)} | {frozenset({f"{i}.dense"}) for i in range(2)}


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.fc3(torch.nn.functional.gelu(h)) + h.sum(-1, keepdim=True)


def test_fx_level_module_groups():
    gm = qpasses.trace(ReluMLP().eval(), torch.randn(4, 16))
    groups, refused = find_groups(gm, (torch.randn(4, 16),))
    got = {(g.producer.name, tuple(c.node.name for c in g.consumers)) for g in groups}
    assert got == {("ln", ("fc1",)), ("fc1", ("fc2",))}
    reasons = {r.producer.name: r.reason for r in refused}
    assert "gelu" in reasons["fc2"]


class Squares(nn.Module):
    """x * x after a linear is not homogeneous: fc1 -> fc2 must not be a group."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * h.transpose(0, 1).transpose(0, 1))


def test_product_of_two_producer_values_refused():
    gm = qpasses.trace(Squares().eval(), torch.randn(3, 8))
    groups, refused = find_groups(gm, (torch.randn(3, 8),))
    assert not [g for g in groups if g.producer.name == "fc1"]
    assert any(r.producer.name == "fc1" for r in refused)
