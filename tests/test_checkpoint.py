"""compressed-tensors checkpoints (``qpasses.checkpoint.save_compressed``) of w4a16, W8A8 int8 (dynamic
per token) and fp8 results of a tiny HF Llama: written with the compressed-tensors package, reloaded
through transformers' compressed-tensors loader (ModelCompressor decompression), and compared
weight for weight -- exactly -- with the fake-quantized weights of the graph."""
import json

import pytest
import torch

import qpasses

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from qpasses.checkpoint import CheckpointError, save_compressed  # noqa: E402
from qpasses.kernels.lowering import Int4GroupFakeQuantize  # noqa: E402
from qpasses.numerics import FakeQuantize  # noqa: E402
from qpasses.numerics.fp8 import Fp8FakeQuantize  # noqa: E402
from qpasses.qnodes import quantizer_module  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_graph():
    m = tiny_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    return m, qpasses.trace(m, (ids,)), ids


def graph_weights(q):
    """{get_attr path of the weight: fake-quantized weight} read off the graph (dynamic_int8's
    weights are per-channel FakeQuantize nodes, like every other weight quantizer)."""
    out = {}
    for n in q.graph.nodes:
        mod = quantizer_module(q, n, (Int4GroupFakeQuantize, Fp8FakeQuantize, FakeQuantize))
        if mod is not None and n.args and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr":
            t = n.args[0].target
            w = dict(q.named_parameters()).get(t)
            w = w if w is not None else q.get_buffer(t)
            if w.dim() == 2:
                out[t[: -len(".weight")]] = mod(w.detach()).float()
    return out


def reload(directory):
    from transformers import CompressedTensorsConfig
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


CASES = [
    ("w4a16", {"group_size": 32}, "pack-quantized"),
    ("w4a16", {"group_size": 64, "symmetric": False}, "pack-quantized"),
    ("dynamic_int8", {"symmetric": True}, "int-quantized"),
    ("w8a8_fp8", {"activations": "dynamic"}, "float-quantized"),
    ("w8a8_fp8", {"activations": "static"}, "float-quantized"),
]


@pytest.mark.parametrize("recipe,opts,fmt", CASES, ids=[f"{r}-{'-'.join(map(str, o.values()))}" for r, o, _ in CASES])
def test_roundtrip_weights_exact(tmp_path, llama_graph, recipe, opts, fmt):
    m, gm, ids = llama_graph
    pm = qpasses.PassManager(recipe, **opts)
    q = pm.run(gm, data=[ids])
    qc = save_compressed(q, m, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg == qc and cfg["quant_method"] == "compressed-tensors" and cfg["format"] == fmt
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and cfg["ignore"] == []
    w = group["weights"]
    if recipe == "w4a16":
        assert (w["num_bits"], w["type"], w["strategy"], w["group_size"]) == (4, "int", "group", opts["group_size"])
        assert w["symmetric"] == opts.get("symmetric", True) and group["input_activations"] is None
    elif recipe == "dynamic_int8":
        assert (w["num_bits"], w["type"], w["strategy"]) == (8, "int", "channel")
        a = group["input_activations"]
        assert (a["type"], a["strategy"], a["dynamic"]) == ("int", "token", True)
    else:
        assert (w["num_bits"], w["type"], w["strategy"]) == (8, "float", "channel")
        a = group["input_activations"]
        want = ("token", True) if opts["activations"] == "dynamic" else ("tensor", False)
        assert (a["type"], a["strategy"], a["dynamic"]) == ("float",) + want
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32     # the user's model untouched

    expected = graph_weights(q)
    back = reload(str(tmp_path))
    linears = {n: mod for n, mod in back.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert len(linears) == 15
    matched = 0
    for path, wq in expected.items():
        name = next(n for n in linears if path == n or path.endswith("." + n))
        assert torch.equal(linears[name].weight.detach().float(), wq), name
        matched += 1
    assert matched == 15
    # every weight really is quantized (not the float one)
    assert not torch.equal(linears["model.layers.0.mlp.down_proj"].weight, m.model.layers[0].mlp.down_proj.weight)
    if recipe == "w4a16":
        # weight-only: the reloaded model computes what the quantized graph computes
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, q(ids).logits, rtol=1e-5, atol=1e-5)


def test_fp8_codes_and_input_scale_in_safetensors(tmp_path, llama_graph):
    from safetensors.torch import load_file
    m, gm, ids = llama_graph
    q = qpasses.PassManager("w8a8_fp8").run(gm, data=[ids])
    save_compressed(q, m, str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    fq = Fp8FakeQuantize.fit(m.model.layers[1].mlp.up_proj.weight, 0)
    assert sd["model.layers.1.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"].float(),
                       fq.codes(m.model.layers[1].mlp.up_proj.weight).float())
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight_scale"].reshape(-1), fq.scale)
    # q, k and v read one activation: one calibrated input scale, written to each
    s = [sd[f"model.layers.0.self_attn.{p}_proj.input_scale"] for p in "qkv"]
    assert torch.equal(s[0], s[1]) and torch.equal(s[0], s[2]) and float(s[0]) > 0


def test_skipped_layers_are_ignored(tmp_path, llama_graph):
    m, gm, ids = llama_graph
    q = qpasses.PassManager("w8a8_fp8", activations="dynamic", skip=["*lm_head*"]).run(gm)
    qc = save_compressed(q, m, str(tmp_path))
    assert qc["ignore"] == ["lm_head"]
    back = reload(str(tmp_path))
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)


def test_unsupported_results_name_the_cause(tmp_path, llama_graph):
    m, gm, ids = llama_graph
    q = qpasses.PassManager("ptq_int8").run(gm, data=[ids])
    with pytest.raises(CheckpointError, match="integer FakeQuantize weights"):
        save_compressed(q, m, str(tmp_path))
    q = qpasses.PassManager("dynamic_int8", granularity="per_tensor").run(gm)
    with pytest.raises(CheckpointError, match="per-token"):
        save_compressed(q, m, str(tmp_path))


def test_tied_lm_head_is_refused_unless_skipped(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    m = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    gm = qpasses.trace(m, (ids,))
    q = qpasses.PassManager("w8a8_fp8", activations="dynamic").run(gm)
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        save_compressed(q, m, str(tmp_path / "a"))
    q = qpasses.PassManager("w8a8_fp8", activations="dynamic", skip=["*lm_head*"]).run(gm)
    qc = save_compressed(q, m, str(tmp_path / "b"))
    assert qc["ignore"] == ["lm_head"]
    back = reload(str(tmp_path / "b"))
    assert torch.equal(back.model.embed_tokens.weight, m.model.embed_tokens.weight)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    wq = graph_weights(q)
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, wq["model.layers.0.mlp.up_proj"])
