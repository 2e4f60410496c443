"""Verify mode: the graph's outputs checked on sample inputs after every unit of a run."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.fx as fx

from .errors import OptionError, VerifyError
from .frontend import as_inputs, input_arity

__all__ = ["Verifier"]


class Verifier:
    """Checks a run's graph after each unit against the original outputs.

    ``exact`` units must keep the outputs (relative to those before the unit) within
    ``tol``; ``sqnr`` units report the signal-to-noise ratio against the original and must
    stay finite; ``none`` units are not checked.  Findings go to ``records``
    (``pm.report.verify``)."""

    def __init__(self, gm: fx.GraphModule, data: Any, example_inputs: Any, tol: float, records: List[Dict]):
        self.tol = tol
        self.records = records
        self.sample = self._sample(gm, data, example_inputs)
        self.reference = self.before = self._forward(gm)

    @staticmethod
    def _sample(gm: fx.GraphModule, data: Any, example_inputs: Any):
        if example_inputs is not None:
            return as_inputs(example_inputs)
        ex = getattr(gm, "meta", {}).get("qpasses.example_inputs")
        if ex is not None:
            return as_inputs(ex)
        if data is not None:
            for batch in data:
                return as_inputs(batch, input_arity(gm))
        raise OptionError("verify=True needs sample inputs: pass example_inputs= or data=, or trace with qpasses.trace")

    def _forward(self, gm: fx.GraphModule) -> List[torch.Tensor]:
        with torch.no_grad():
            out = gm(*self.sample)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return [o.detach().float() for o in flat if isinstance(o, torch.Tensor)]

    def check(self, gm: fx.GraphModule, label: str, mode: str) -> None:
        """Check the outputs of ``gm`` after unit ``label`` (``mode``: exact | sqnr | none)."""
        got = self._forward(gm)
        before, self.before = self.before, got
        if mode == "none":
            return
        reference = self.reference
        if len(got) != len(reference):
            raise VerifyError(f"after {label}: the graph returns {len(got)} tensors, the original {len(reference)}")
        worst_err, worst_sqnr = 0.0, math.inf
        for r, p, g in zip(reference, before, got):
            if r.shape != g.shape:
                raise VerifyError(f"after {label}: output shape {tuple(g.shape)} != original {tuple(r.shape)}")
            if not torch.isfinite(g).all():
                raise VerifyError(f"after {label}: outputs contain NaN/inf")
            err = (p - g).abs().max().item() if p.numel() else 0.0
            scale = max(p.abs().max().item() if p.numel() else 0.0, 1.0)
            worst_err = max(worst_err, err / scale)
            noise = (r - g).pow(2).sum().item()
            sig = r.pow(2).sum().item()
            worst_sqnr = min(worst_sqnr, math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise))
        if mode == "exact":
            self.records.append({"after": label, "metric": "max_rel_err", "value": worst_err})
            if worst_err > self.tol:
                raise VerifyError(f"after {label}: outputs changed by {worst_err:.3g} (relative to the outputs "
                                  f"before it), more than verify_tol={self.tol}")
        else:
            self.records.append({"after": label, "metric": "sqnr_db", "value": worst_sqnr})
