"""Calibration refuses what it cannot calibrate on, and says which is which."""
import pytest
import torch

import qpasses
from qpasses.errors import OptionError, StepError
from qpasses.zoo import MODELS, example_input


def _gm():
    m = MODELS["mlp"]().eval()
    x = example_input("mlp", batch=4)
    return qpasses.trace(m, (x,)), x


def test_constant_data_warns_naming_the_node_and_strict_refuses():
    gm, x = _gm()
    zeros = torch.zeros_like(x)
    pm = qpasses.PassManager("ptq_int8", quiet=True)
    with pytest.warns(UserWarning, match="constant on all the calibration data"):
        pm.run(gm, data=[zeros])
    assert any("act_q_0" in w for w in pm.report.warnings), pm.report.warnings
    with pytest.raises(StepError, match="strict_calibration=True"):
        qpasses.PassManager("ptq_int8", quiet=True, strict_calibration=True).run(gm, data=[zeros])
    pm = qpasses.PassManager("ptq_int8", quiet=True)           # real data: no warning
    pm.run(gm, data=[x])
    assert not any("constant" in w for w in pm.report.warnings)


def test_nan_input_is_not_reported_as_an_overflow():
    gm, x = _gm()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(StepError, match="NaN or inf in input 0") as e:
        qpasses.PassManager("ptq_int8", quiet=True).run(gm, data=[x, bad])
    assert "overflow inside" in str(e.value) and "overflows on" not in str(e.value)


@pytest.mark.parametrize("opts", [{"w_bits": None}, {"a_bits": None}, {"w_bits": "8"}, {"per_channel": None}])
def test_every_option_is_checked_before_the_first_stage(opts):
    gm, x = _gm()
    with pytest.raises(OptionError):
        qpasses.PassManager("ptq_int8", **opts)
