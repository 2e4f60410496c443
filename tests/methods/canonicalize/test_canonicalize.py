"""Rule family `canonicalize`: BN folding at module level and aten level."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpasses
from qpasses import PassManager
from qpasses.zoo import MobileNetV2Like, ResNetLike

from conftest import randomize_bn


def count(gm, cls_name):
    from qpasses.opclasses import classify
    mods = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes if classify(n, mods) == cls_name)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.ct = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = self.bn2(self.ct(y))
        y = y.mean((2, 3))
        return self.bn3(self.fc(y))


class Refused(nn.Module):
    """conv -> relu -> bn (BN does not consume the conv) and conv used twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(torch.relu(self.c1(x)))
        z = self.c2(y)
        return self.bn2(z) + z


@pytest.mark.parametrize("model_fn", [ConvBN, lambda: ResNetLike(in_ch=3), lambda: MobileNetV2Like(in_ch=3)])
def test_fold_matches_and_keeps_numerics(level, model_fn):
    model = randomize_bn(model_fn()).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    gm = qpasses.trace(model, x, mode=level)
    n_bn = count(gm, "batch_norm")
    pm = PassManager("canonicalize")
    out = pm.run(gm)
    assert n_bn > 0 and count(out, "batch_norm") == 0
    assert pm.report["fold_bn"].rewrites == n_bn
    torch.testing.assert_close(out(x), ref, rtol=1e-4, atol=1e-4)


def test_fold_refuses_with_reasons(level):
    model = randomize_bn(Refused()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(model, x, mode=level)
    pm = PassManager("canonicalize")
    out = pm.run(gm)
    st = pm.report["fold_bn"]
    assert st.rewrites == 0 and count(out, "batch_norm") == 2
    reasons = " | ".join(r for _, r in st.failures + st.refused)
    assert "is not weighted" in reasons or "not weighted" in reasons  # bn1 reads relu
    assert "also used outside the match" in reasons                  # c2 has two users
    torch.testing.assert_close(out(x), model(x))
    bn1 = [n for n in gm.graph.nodes if count_one(gm, n) == "batch_norm"][0]
    why = pm.explain("fold_bn", bn1)
    assert not why and "relu" in why.reason


def count_one(gm, node):
    from qpasses.opclasses import classify
    return classify(node, dict(gm.named_modules()))


def test_training_bn_is_left_alone():
    model = randomize_bn(ConvBN())
    x = torch.randn(2, 3, 8, 8)
    model.train()
    gm = qpasses.trace(model, x, mode="fx")
    pm = PassManager("canonicalize")
    out = pm.run(gm)
    assert pm.report["fold_bn"].rewrites == 0
    assert any("training mode" in r for _, r in pm.report["fold_bn"].refused)
    assert count(out, "batch_norm") == 3


def test_shared_conv_module_stays_correct():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn(self.conv(x))   # folded call site
            b = self.conv(x)            # must keep the original weights
            return a + b

    model = randomize_bn(Shared()).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = qpasses.trace(model, x, mode="fx")
    pm = PassManager("canonicalize")
    out = pm.run(gm)
    assert pm.report["fold_bn"].rewrites == 1
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    targets = {n.target for n in out.graph.nodes if n.op == "call_module"}
    assert len(targets) == 2  # the folded site got its own module


def test_idempotent_and_input_untouched(level):
    model = randomize_bn(ResNetLike(in_ch=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    gm = qpasses.trace(model, x, mode=level)
    before = gm.code
    params_before = {k: v.clone() for k, v in gm.state_dict().items()}
    once = PassManager("canonicalize").run(gm)
    assert gm.code == before
    for k, v in gm.state_dict().items():
        assert torch.equal(v, params_before[k])
    pm2 = PassManager("canonicalize")
    twice = pm2.run(once)
    assert pm2.report.rewrites == 0
    torch.testing.assert_close(twice(x), once(x))


def test_verify_mode_reports(level):
    model = randomize_bn(ConvBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(model, x, mode=level)
    pm = PassManager("canonicalize", verify=True)
    pm.run(gm)
    assert pm.report.verify and pm.report.verify[0]["metric"] == "max_rel_err"
    assert pm.report.verify[0]["value"] < 1e-4


def test_exact_stage_is_judged_on_its_own_change_after_a_quantizing_stage(level, tmp_path):
    """verify: an `exact` stage (canonicalize) that runs after a stage that changed the numerics
    (qat's fused, fake-quantized conv-BN) compares with the outputs just before it, not the float
    original -- and a stage that does change them is still caught."""
    model = randomize_bn(ConvBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(model, x, mode=level)
    pm = PassManager("qat", verify=True)
    pm.run(gm, data=[x])
    rows = {r["after"]: r for r in pm.report.verify}
    assert rows["canonicalize.canonicalize"]["value"] < 1e-6
    assert rows["convert.convert"]["metric"] == "sqnr_db" and rows["convert.convert"]["value"] < 80

    @qpasses.action("scale_relu_input_test")
    def scale_relu_input(ctx, relu):
        with ctx.graph.inserting_before(relu):
            y = ctx.graph.call_function(torch.mul, (relu.args[0], 2.0))
        relu.replace_input_with(relu.args[0], y)

    f = tmp_path / "badfam.yaml"
    f.write_text("version: 1\nfamily: badfam\nstages:\n  - name: bad\n    verify: exact\nrules:\n"
                 "  - name: bad\n    match: (relu $r ?x)\n    rewrite: scale_relu_input_test($r)\n")
    from qpasses.errors import VerifyError
    with pytest.raises(VerifyError, match="badfam.bad: outputs changed by .*relative to the outputs before it"):
        PassManager(["ptq_int8", str(f)], verify=True).run(gm, data=[x])
