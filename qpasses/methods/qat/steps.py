"""The ``first_batch_init`` data step: fake quantizers that take their scale from the first batch.

Training recipes (``qat``, ``bnn``) run without data: their ``calibrate`` step has
``no_data: first_batch``, which gives the observers that saw nothing a placeholder range and
marks them; ``convert`` turns them into fake quantizers as usual; this step, after ``convert``,
replaces each marked one by a :class:`~qpasses.methods.qat.lib.FirstBatchFakeQuantize`, which sets
its scale from the first batch it sees (LSQ: ``2 * mean|x| / sqrt(Qp)``).  Until ``qat_convert``
freezes it, such a pending initialiser is a ``call_module`` node (it has state to set); its
forward is then one quantizer op call.  With data, nothing
is marked and the step changes nothing.
"""
from __future__ import annotations

from ...lang.registry import data_step
from ...numerics import FakeQuantize
from ..ptq.calibrate import FIRST_BATCH_KEY

__all__ = ["first_batch_init"]


@data_step("first_batch_init", args={}, needs_data=False)
def first_batch_init(ctx) -> None:
    """Make the fake quantizers of observers that saw no data initialise on their first batch."""
    from .lib import FirstBatchFakeQuantize
    gm = ctx.gm
    marked = [(name, m) for name, m in gm.named_modules()
              if isinstance(m, FakeQuantize) and not isinstance(m, FirstBatchFakeQuantize)
              and isinstance(getattr(m, "qpasses_config", None), dict) and m.qpasses_config.get(FIRST_BATCH_KEY)]
    from ...context import RewriteContext
    from ...qnodes import as_module_call, holder_target
    wanted = {name for name, _ in marked}
    rc = RewriteContext(gm)
    for name, m in marked:
        gm.set_submodule(name, FirstBatchFakeQuantize.from_fake_quant(m))
    # a pending initialiser is a stateful module until its first batch: its nodes call it
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and holder_target(n) in wanted:
            as_module_call(rc, n)
    if marked:
        gm.recompile()
    ctx.info.update(first_batch_quantizers=len(marked))
