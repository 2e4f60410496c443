"""Issue 24, calibration data: NaN / inf in the data and an overflow inside the model get
different messages, in every data step (they all read batches through ``iterate_batches``)."""
import numpy as np
import pytest
import torch

import qpasses
from qpasses.errors import StepError
from qpasses.methods.ptq.calibrate import iterate_batches
from qpasses.zoo import MODELS, example_input

NOT_FINITE = "NaN or inf in input 0"
OVERFLOW = "overflows"


def _mlp(scale: float = 1.0):
    """The zoo MLP; ``scale`` != 1: every weight of the first layer is ``scale`` (1e38: it
    overflows float32 on ordinary inputs)."""
    torch.manual_seed(0)
    m = MODELS["mlp"]().eval()
    if scale != 1.0:
        with torch.no_grad():
            m.net[1].weight.fill_(scale)
    x = example_input("mlp", batch=4)
    return qpasses.trace(m, (x,)), x


def test_an_overflow_in_the_model_is_not_reported_as_bad_data():
    gm, x = _mlp(1e38)                       # finite data, weights that overflow float32
    assert torch.isfinite(x).all() and not torch.isfinite(gm(x)).all()
    with pytest.raises(StepError) as e:
        qpasses.PassManager("ptq_int8", quiet=True).run(gm, data=[x])
    assert "the float model overflows" in str(e.value) and NOT_FINITE not in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_named_as_such_by_gptq(bad):
    gm, x = _mlp()
    y = x.clone()
    y[1, 0] = bad
    before = gm.code
    with pytest.raises(StepError) as e:
        qpasses.PassManager("gptq", group_size=0, quiet=True).run(gm, data=[x, y])
    assert "calibration batch 1 has " + NOT_FINITE + " (gptq)" in str(e.value) and OVERFLOW not in str(e.value).replace(
        "not an overflow", "")
    assert gm.code == before
    # finite data runs
    qpasses.PassManager("gptq", group_size=0, quiet=True).run(gm, data=[x, x])


def test_gptq_names_an_overflow_inside_the_model():
    gm, x = _mlp(1e38)
    with pytest.raises(StepError) as e:
        qpasses.PassManager("gptq", group_size=0, quiet=True).run(gm, data=[x])
    assert "the model overflows before this layer" in str(e.value) and NOT_FINITE not in str(e.value)


def test_iterate_batches_checks_numpy_batches_too():
    """ONNX calibration (qpasses.onnx.quantize_onnx) reads NumPy batches through the same function."""
    good = np.ones((2, 3), np.float32)
    bad = good.copy()
    bad[0, 1] = np.inf
    assert len(list(iterate_batches([good, good.astype(np.int64)], desc="calibrate (onnxruntime)"))) == 2
    with pytest.raises(StepError, match=r"batch 1 has NaN or inf in input 0 \(calibrate \(onnxruntime\)\)"):
        list(iterate_batches([good, bad], desc="calibrate (onnxruntime)"))
    with pytest.raises(StepError, match="batch 0 has NaN or inf in input 1"):     # the second input of a tuple
        list(iterate_batches([(torch.ones(2), torch.tensor([float("nan")]))]))


def test_a_bit_map_alias_bomb_is_refused_fast(tmp_path):
    """bit_map_file is read from a file someone may hand you (docs/security.md): YAML aliases
    are refused before anything is expanded, so a bomb fails at once instead of eating memory."""
    import time
    from qpasses.methods.bits.actions import load_bit_map
    from qpasses.errors import OptionError
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, 9)]   # 9**9 leaves
    p = tmp_path / "bits.yaml"
    p.write_text("\n".join(lines) + "\nconv1: {w_bits: 4}\n")
    t0 = time.process_time()
    with pytest.raises(OptionError, match=r"line 2: YAML aliases \(\*a0\) are not supported"):
        load_bit_map(str(p))
    assert time.process_time() - t0 < 1.0
    good = tmp_path / "good.yaml"
    good.write_text("conv1: {w_bits: 4, a_bits: 8}\nfc: {w_bits: 2}\n")
    assert load_bit_map(str(good))["fc"]["w_bits"] == 2
