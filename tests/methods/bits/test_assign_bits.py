"""The ``assign_bits`` family and the ``mixed_ptq`` recipe: per-layer bit-widths honoured by convert."""
from __future__ import annotations


import pytest
import torch

import qpasses
from qpasses import zoo
from qpasses.methods.bits.actions import apply_bit_map, layer_name, load_bit_map, normalize_bit_map, save_bit_map
from qpasses.errors import OptionError
from qpasses.numerics import FakeQuantize

from conftest import randomize_bn
from qpasses.qnodes import quantizer_module


def _setup(level="fx"):
    torch.manual_seed(0)
    m = randomize_bn(zoo.DigitsCNN(8)).eval()
    x = torch.randn(64, 1, 8, 8)
    return m, qpasses.trace(m, (x[:4],), mode=level), [x[:32], x[32:]], x


def _weight_bits(q):
    """layer name -> (weight bits, input activation bits) read from the converted graph."""
    out = {}
    for n in q.graph.nodes:
        if n.op != "call_function" or "weight" not in n.meta.get("qpasses.quant", {}):
            continue
        w, x = n.args[1], n.args[0]
        wb = quantizer_module(q, w, None).bits
        ab = quantizer_module(q, x, None).bits if isinstance(
            quantizer_module(q, x, None), FakeQuantize) else None
        out[n.meta.get("qpasses.module") or layer_name(n)] = (wb, ab)
    return out


def test_inline_map_exact_beats_glob(level):
    m, gm, data, x = _setup(level)
    pm = qpasses.PassManager("mixed_ptq", bit_map={"features.*": [3, 6], "features.0": [8, 8], "fc": 4})
    q = pm.run(gm, data=data)
    bits = _weight_bits(q)
    assert sorted(b for b, _ in bits.values()) == [3, 3, 4, 8]
    assert pm.report["assign_layer_bits"].rewrites == 4
    if level == "fx":
        assert bits["features.0"] == (8, 8) and bits["features.3"] == (3, 6) and bits["fc"] == (4, 8)
    assert all("qpasses.bits" not in n.meta for n in gm.graph.nodes)      # input graph untouched
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_more_bits_is_closer_to_float():
    m, gm, data, x = _setup()
    with torch.no_grad():
        ref = gm(x)
    errs = []
    for b in (2, 4, 8):
        q = qpasses.PassManager("mixed_ptq", bit_map={"*": [b, 8]}).run(gm, data=data)
        with torch.no_grad():
            errs.append(float((q(x) - ref).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("ext", ["json", "yaml"])
def test_map_from_file_and_inline_override(tmp_path, ext):
    m, gm, data, x = _setup()
    path = tmp_path / f"bits.{ext}"
    save_bit_map(str(path), {"features.0": {"w_bits": 5, "a_bits": 7}, "features.3": [2, 4], "fc": [6, 8]})
    assert load_bit_map(str(path))["features.3"] == {"w_bits": 2, "a_bits": 4}
    q = qpasses.PassManager("mixed_ptq", bit_map_file=str(path), bit_map={"fc": [7, 8]}).run(gm, data=data)
    bits = _weight_bits(q)
    assert bits["features.0"] == (5, 7) and bits["features.3"] == (2, 4) and bits["fc"] == (7, 8)
    assert bits["features.7"] == (8, 8)                     # no entry: recipe defaults


def test_unmapped_layers_are_reported_and_keep_defaults():
    m, gm, data, x = _setup()
    pm = qpasses.PassManager("mixed_ptq", bit_map={"fc": [4, 8]}, w_bits=6)
    q = pm.run(gm, data=data)
    st = pm.report["assign_layer_bits"]
    assert st.rewrites == 1 and st.n_refused == 3 and "no entry in the bit map" in st.refused[0][1]
    assert sorted(b for b, _ in _weight_bits(q).values()) == [4, 6, 6, 6]


def test_bad_maps_raise_clear_errors(tmp_path):
    m, gm, data, x = _setup()
    with pytest.raises(OptionError, match="features.30"):
        qpasses.PassManager("mixed_ptq", bit_map={"features.30": [4, 8]}).run(gm, data=data)
    with pytest.raises(OptionError, match="outside"):
        normalize_bit_map({"fc": [40, 8]})
    with pytest.raises(OptionError, match="w_bits, a_bits"):
        normalize_bit_map({"fc": [4, 8, 2]})
    with pytest.raises(OptionError, match="integer"):
        normalize_bit_map({"fc": ["four", 8]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OptionError, match="not valid JSON"):
        load_bit_map(str(bad))
    with pytest.raises(OptionError, match="cannot read"):
        load_bit_map(str(tmp_path / "missing.json"))


def test_apply_bit_map_helper_and_layer_names():
    m, gm, data, x = _setup()
    done = apply_bit_map(gm, {"features.3": [3, 5]})
    assert done == {"features.3": {"w_bits": 3, "a_bits": 5}}
    names = [layer_name(n) for n in gm.graph.nodes if n.op == "call_module"]
    assert "features.0" in names and "fc" in names
    m2, ge, _, _ = _setup("export")
    assert {"features.0", "features.3", "features.7", "fc"} <= {layer_name(n) for n in ge.graph.nodes}
