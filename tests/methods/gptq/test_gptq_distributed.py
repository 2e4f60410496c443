"""Data-parallel GPTQ: two gloo processes, each with half the batches, against one process that
sees all of them.  The Hessians' float64 sums and the row counts are all-reduced, so both ranks
solve the problem one process solves: the same codes, scales and weights."""
from __future__ import annotations

import os

import torch

import qpasses
from conftest import spawn_two
from qpasses.kernels.lowering import Int4GroupFakeQuantize
from qpasses.numerics import FakeQuantize

from test_gptq import Net, _net_data

torch.set_num_threads(1)

#: (options, batches): 5 batches split 3 / 2; 1 batch leaves rank 1 without data (it still joins the reductions)
CASES = [(dict(group_size=32), 5), (dict(group_size=0, act_order=True), 5), (dict(group_size=32, sequential=False), 5),
         (dict(group_size=32), 1)]


def _gm():
    torch.manual_seed(0)
    model = Net().eval()
    return qpasses.trace(model, (_net_data(1)[0][:2],))


def _weights(q):
    """{op: (weight, scales or None)} of every quantized weight (either quantizer-node form)."""
    from qpasses.qnodes import quantizer_module
    out = {}
    for n in q.graph.nodes:
        m = quantizer_module(q, n, kinds=(FakeQuantize, Int4GroupFakeQuantize))
        if m is None or not (isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"):
            continue
        obj = q
        for p in str(n.args[0].target).split("."):
            obj = getattr(obj, p)
        s = m.scales if isinstance(m, Int4GroupFakeQuantize) else m.scale
        out[next(iter(n.users)).name] = (obj.detach().clone(), s.detach().clone())
    return out


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {"weights": [], "info": []}
    try:
        for kw, nb in CASES:
            pm = qpasses.PassManager("gptq", progress=False, **kw)
            res["weights"].append(_weights(pm.run(_gm(), data=_net_data(nb))))
            info = dict(pm.report.steps[-1].info)
            info.pop("per_layer")
            res["info"].append(info)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, timeout=240):
    return spawn_two(_worker, tmp_path, "GPTQ", timeout)


def test_two_processes_give_the_weights_of_one(tmp_path):
    r0, r1 = _spawn(tmp_path)
    for i, (kw, nb) in enumerate(CASES):
        pm = qpasses.PassManager("gptq", progress=False, **kw)
        ref = _weights(pm.run(_gm(), data=_net_data(nb)))
        rows = pm.report.steps[-1].info["rows"]
        for r in (r0, r1):
            got = r["weights"][i]
            assert got.keys() == ref.keys() and len(ref) == 5
            for op in ref:
                assert torch.equal(got[op][1], ref[op][1]), (kw, op)      # same scales
                assert torch.equal(got[op][0], ref[op][0]), (kw, op)      # same quantized weights
            info = r["info"][i]
            assert info["world_size"] == 2 and info["rows"] == rows        # every rank counted all the rows
    assert (r0["info"][0]["batches"], r1["info"][0]["batches"]) == (3, 2)  # each rank ran its shard
    assert (r0["info"][3]["batches"], r1["info"][3]["batches"]) == (1, 0)  # rank 1 had none and still took part
