"""qpasses.save / qpasses.load: torch.export archives (.pt2) round trip, and nothing in a file
is unpickled or evaluated when it is loaded.

Each crafted archive below creates its marker file when given to a bare
``torch.export.load`` (checked by hand with torch 2.13: a pickled weight, an ``opaque_obj``
constant, pickled example inputs, a shape expression that ``sympy.sympify`` evaluates);
``qpasses.load`` refuses them before torch reads them."""
from __future__ import annotations

import json
import os
import pathlib
import zipfile

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses.numerics import FakeQuantize
from qpasses import zoo
from qpasses.io import ArchiveError, _check_targets, check_archive

torch.set_num_threads(1)


class TinyAttention(nn.Module):
    """A transformer-like block: LayerNorm, a fused QKV Linear, attention matmuls, an MLP."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


def _quantized(model, x, recipe):
    gm = qpasses.trace(model.eval(), (x,))
    return qpasses.PassManager(recipe).run(gm, data=[x, torch.randn_like(x)])


def _assert_same(a, b, *inputs):
    with torch.no_grad():
        for x in inputs:
            assert torch.equal(a(x), b(x))


def test_round_trip_quantized_cnn(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    qgm = _quantized(zoo.DigitsCNN(), x, "ptq_int8")
    path = qpasses.save(qgm, tmp_path / "cnn.pt2")          # example inputs from gm.meta (qpasses.trace)
    loaded = qpasses.load(path)
    assert isinstance(loaded, fx.GraphModule)
    fq = [n for n in loaded.graph.nodes if str(n.target).startswith("qpasses.fake_quant")]
    assert len(fq) == sum(isinstance(m, FakeQuantize) for m in qgm.modules()) > 0  # one op node per quantizer
    _assert_same(loaded, qgm, x, torch.randn(3, 1, 8, 8))   # another batch size: the batch is dynamic
    assert torch.equal(loaded.meta["qpasses.example_inputs"][0], x)
    assert loaded.eval() is loaded and not loaded.training  # a plain GraphModule: eval() works


@pytest.mark.parametrize("recipe", ["ptq_int8", "dynamic_int8"])
def test_round_trip_transformer_like(tmp_path, recipe):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    qgm = _quantized(TinyAttention(), x, recipe)
    qpasses.save(qgm, tmp_path / "t.pt2")
    loaded = qpasses.load(tmp_path / "t.pt2")
    _assert_same(loaded, qgm, x, torch.randn(4, 6, 32))
    check_archive(tmp_path / "t.pt2")


def test_save_needs_example_inputs_and_a_pt2_path(tmp_path):
    m = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(ArchiveError, match="example inputs"):
        qpasses.save(m, tmp_path / "m.pt2")
    with pytest.raises(ArchiveError, match=r"\.pt2"):
        qpasses.save(m, tmp_path / "m.pt", example_inputs=torch.randn(2, 4))
    qpasses.save(m, tmp_path / "m.pt2", example_inputs=torch.randn(2, 4))
    loaded = qpasses.load(tmp_path / "m.pt2")
    x = torch.randn(5, 4)
    _assert_same(loaded, m, x)


# ----------------------------------------------------------------------------- unsafe archives

class _Touch:
    """Unpickling this object creates the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "lin.pt2"
    qpasses.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), path, example_inputs=torch.randn(2, 4))
    return path


def _rewrite(src, dst, change):
    """Copy the zip ``src`` to ``dst``, passing each (name, bytes) through ``change`` (None: drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        for name in zin.namelist():
            data = change(name[len(root):], zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        extra = change("<extra>", None)
        for rel, data in (extra or {}).items():
            zout.writestr(root + rel, data)
    return dst


def _evil(marker) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save({"x": _Touch(marker)}, buf)
    return buf.getvalue()


def _pickled_weight(marker):
    def change(rel, data):
        if rel.endswith("_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"].values()))
            first["use_pickle"] = True
            return json.dumps(cfg).encode()
        if rel == "data/weights/weight_0":
            return _evil(marker)
        return None if rel == "<extra>" else data
    return change


def _opaque_constant(marker):
    import pickle

    def change(rel, data):
        if rel.endswith("_constants_config.json"):
            return json.dumps({"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False,
                                                  "use_pickle": True, "tensor_meta": None}}}).encode()
        if rel == "<extra>":
            return {"data/constants/opaque_obj_0": pickle.dumps(_Touch(marker))}
        return data
    return change


def _evil_sample_inputs(marker):
    def change(rel, data):
        if rel.startswith("data/sample_inputs/"):
            return _evil(marker)
        return None if rel == "<extra>" else data
    return change


def _evil_shape_expression(marker):
    payload = f"__import__('os').open({str(marker)!r}, 65)"

    def change(rel, data):
        if rel.startswith("models/"):
            text = data.decode()
            assert '"expr_str": "' in text                       # the batch dimension is symbolic
            head, tail = text.split('"expr_str": "', 1)
            return (head + '"expr_str": ' + json.dumps(payload) + tail[tail.index('"') + 1:]).encode()
        return None if rel == "<extra>" else data
    return change


@pytest.mark.parametrize("attack,message", [
    (_pickled_weight, "pickled"),
    (_opaque_constant, "opaque_obj_0"),
    (_evil_sample_inputs, "example inputs"),
    (_evil_shape_expression, "shape expression"),
])
def test_load_refuses_archives_that_would_run_code(tmp_path, archive, attack, message):
    marker = tmp_path / "MARKER"
    bad = _rewrite(archive, tmp_path / "bad.pt2", attack(marker))
    with pytest.raises(ArchiveError, match=message):
        qpasses.load(bad)
    assert not marker.exists()


def test_load_reports_damaged_files(tmp_path, archive):
    (tmp_path / "text.pt2").write_bytes(b"not a zip at all")
    with pytest.raises(ArchiveError, match="not a zip file"):
        qpasses.load(tmp_path / "text.pt2")
    data = archive.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError):
        qpasses.load(tmp_path / "cut.pt2")
    with pytest.raises(ArchiveError, match="no such file"):
        qpasses.load(tmp_path / "missing.pt2")
    legacy = _rewrite(archive, tmp_path / "legacy.pt2",
                      lambda rel, d: {"serialized_state_dict.pt": b"x"} if rel == "<extra>" else d)
    with pytest.raises(ArchiveError, match="serialized_state_dict.pt"):
        qpasses.load(legacy)


def test_loaded_graph_may_call_operators_only():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(os.getcwd, ()))
    with pytest.raises(ArchiveError, match="not an operator"):
        _check_targets(fx.GraphModule(nn.Module(), g), "f.pt2")
    g2 = fx.Graph()
    x = g2.placeholder("x")
    g2.output(g2.call_function(torch.ops.aten.relu.default, (x,)))
    _check_targets(fx.GraphModule(nn.Module(), g2), "f.pt2")
