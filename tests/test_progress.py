"""Long data steps draw a tqdm bar (with the time left) unless ``progress`` is off."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses

from conftest import randomize_bn

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _gm():
    torch.manual_seed(0)
    return qpasses.trace(randomize_bn(Net()).eval(), (torch.randn(2, 1, 8, 8),))


def _data(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(n)]


CASES = {
    "calibrate": ("ptq_int8", {}, True),
    "distill": ("genie_distill", dict(samples=4, distill_batch_size=4, distill_iters=2), False),
    "reconstruct": ("adaround", dict(recon_iters=2, calib_batch_size=8), True),
    "search_bits": ("haq", dict(method="hessian", budget_bits=[4, 8], hutchinson_iters=1), True),
}


@pytest.mark.parametrize("step", sorted(CASES))
def test_long_steps_show_a_bar_with_time_left(step, capsys):
    recipe, opts, needs_data = CASES[step]
    qpasses.PassManager(recipe, progress=True, **opts).run(_gm(), data=_data() if needs_data else None)
    err = capsys.readouterr().err
    assert step in err                       # the bar names its step
    assert "<" in err                        # tqdm's "elapsed<left": the total is known, so is the time left


@pytest.mark.parametrize("step", sorted(CASES))
def test_progress_false_is_silent(step, capsys):
    recipe, opts, needs_data = CASES[step]
    qpasses.PassManager(recipe, progress=False, **opts).run(_gm(), data=_data() if needs_data else None)
    captured = capsys.readouterr()
    assert step not in captured.err and captured.out == ""


def test_steps_read_the_context_flag():
    """Steps consult ``ctx.progress`` (the PassManager's setting) rather than a flag of their own."""
    from qpasses.lang.registry import DATA_STEPS
    from qpasses.methods.ptq.calibrate import progress_bar
    assert progress_bar(False, total=3).disable
    assert not progress_bar(True, total=3).disable
    assert {"calibrate", "distill", "reconstruct", "search_bits"} <= set(DATA_STEPS)
