"""qpasses ptq_int8 -> QDQ ONNX vs onnxruntime.quantization.quantize_static (QDQ, per-channel).

Same trained digits models, same 256 calibration images, same 500 test images.  Rows:

* ``fp32``            -- the float model exported by qpasses;
* ``ort quantize_static`` -- ``quant_pre_process`` + ``quantize_static(QDQ, per_channel=True,
  activation QUInt8, weight QInt8, MinMax calibration)`` on the fp32 ONNX file;
* ``qpasses ptq_int8 (torch) -> export_onnx`` -- the PyTorch route;
* ``qpasses quantize_onnx`` -- the ONNX route (rules on the ONNX graph, calibration in ORT);
* ``qpasses int_only (integerize=false)`` -- also quantizes op outputs, so ORT can fuse
  DQ -> Conv -> Q into integer kernels (QLinearConv);
* ``qpasses ptq_int8 ort_fusable`` -- ``ptq_int8`` with ORT-fusable placement (op outputs observed,
  biases on the int32 grid, ``qpasses.onnx.quantize_for_onnx``), the default for the ONNX target;
* ``qpasses ptq_int8 ort_fusable w_bits=7`` (digits models) -- the same with 7-bit weights, onnxruntime's
  ``reduce_range``: the fused u8 x s8 kernels of x86 CPUs without VNNI add pairs of products in
  saturating int16, which 7-bit weights can never overflow (2 * 255 * 63 < 2^15).

The last column lists the integer kernels in onnxruntime's optimised graph of each model
(``SessionOptions.optimized_model_filepath``) and the float Conv / Gemm / MatMul / Add left.

``--models resnet18``: a ResNet-18-shaped CNN (7x7/2 stem, max pool, 2-2-2-2 BasicBlocks of 64-512
channels, 1000 classes; random weights, BatchNorm folded) on 224x224 images, calibrated on 8 random
batches; "test acc" is then the top-1 agreement with the fp32 model on 32 random images, and the
line after the table prints the latency ratio ``quantize_static / qpasses ort_fusable`` (>= 1: qpasses
is at least as fast), measured side by side in the same run.

Accuracy is measured in onnxruntime (CPU); latency is the best of 5 rounds' median over repeated runs of
one ORT CPU session per model with one intra-op thread (batch 1 and batch 256), each round timing every
model of the table in turn, so that models compared side by side see the same machine load.  Prints a
markdown table.

    python benchmarks/onnx_vs_ort.py [--repeat 200] [--models digits_cnn,mlp,resnet18]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import datetime

import onnx
import torch

import qpasses
from qpasses import datasets, zoo
from qpasses.onnx import export_onnx, ort_session, quantize_for_onnx, quantize_onnx


def resnet18(num_classes: int = 1000) -> torch.nn.Module:
    """ResNet-18's shape (He et al., 2016) from qpasses.zoo's BasicBlock: 7x7/2 stem + 3x3/2 max pool,
    stages of 2 blocks with 64, 128, 256, 512 channels, global average pool, linear."""
    nn = torch.nn
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    ch = 64
    for i, width in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(zoo.BasicBlock(ch, width, 2 if (i > 0 and j == 0) else 1))
            ch = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(ch, num_classes)]
    return nn.Sequential(*layers).eval()


class _Reader:
    def __init__(self, batches, name):
        self.it = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self.it, None)


def ort_static(fp32_path: str, out_path: str, batches) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = out_path.replace(".onnx", "_pre.onnx")
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
    name = onnx.load(pre).graph.input[0].name
    quantize_static(pre, out_path, _Reader(batches, name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


_FUSED = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd")
_FLOAT = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add")


def kernels(path: str) -> str:
    """The integer kernels and the float Conv / Gemm / MatMul / Add left in onnxruntime's optimised graph
    (``SessionOptions.optimized_model_filepath``, Q/DQ fusion on), e.g. ``20 QLinearConv, 1 QGemm``."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = path.replace(".onnx", "_ortopt.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    fused = ", ".join(f"{ops.count(k)} {k}" for k in _FUSED if k in ops) or "-"
    left = ", ".join(f"{ops.count(k)} {k}" for k in _FLOAT if k in ops)
    return fused + (f"; float: {left}" if left else "")


def evaluate(paths, xt: torch.Tensor, yt: torch.Tensor, repeat: int, sizes=(1, 256)):
    """Accuracy, latency per batch size, Q nodes, file size and kernels of each model in ``paths``.

    Latency: one ORT CPU session per model (one thread, Q/DQ fusion on: what a deployment runs);
    5 rounds, each timing every model in turn (``repeat`` runs at batch 1, ``repeat // 10`` at larger
    batches), so all models see the same load; the best of the 5 rounds' medians."""
    sessions = [ort_session(p, threads=1, fuse_qdq=True) for p in paths]
    out = []
    for p, sess in zip(paths, sessions):
        name = sess.get_inputs()[0].name
        pred = sess.run(None, {name: xt.numpy()})[0]
        ops = [n.op_type for n in onnx.load(p).graph.node]
        out.append([float((pred.argmax(1) == yt.numpy()).mean()), {}, ops.count("QuantizeLinear"),
                    os.path.getsize(p), kernels(p)])
    for bs in sizes:
        feeds = [{sess.get_inputs()[0].name: xt[:bs].numpy()} for sess in sessions]
        for sess, feed in zip(sessions, feeds):
            for _ in range(10):
                sess.run(None, feed)
        n = repeat if bs == 1 else max(10, repeat // 10)
        medians = [[] for _ in paths]
        for _ in range(5):  # shared machine: rounds interleave the models; the best round's median
            for i, (sess, feed) in enumerate(zip(sessions, feeds)):
                ts = []
                for _ in range(n):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    ts.append(time.perf_counter() - t)
                medians[i].append(statistics.median(ts))
        for i in range(len(paths)):
            out[i][1][bs] = min(medians[i]) * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--models", default="digits_cnn,mlp,resnet18")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    xt, yt = datasets.load_digits_tensors("test")
    calib = datasets.calib_batches()
    rows = []
    ratios = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            if name == "resnet18":
                rows += run_resnet18(d, args.repeat, ratios)
                continue
            torch.manual_seed(0)
            model = datasets.train_digits_cnn() if name == "digits_cnn" else datasets.train_digits_cnn(model=zoo.MLP())
            gm = qpasses.trace(model, xt[:1])
            fp32 = os.path.join(d, f"{name}_fp32.onnx")
            export_onnx(gm, xt[:1], fp32)
            t = time.perf_counter()
            ort_path = os.path.join(d, f"{name}_ort.onnx")
            ort_static(fp32, ort_path, calib)
            t_ort = time.perf_counter() - t
            t = time.perf_counter()
            qgm = qpasses.PassManager("ptq_int8").run(gm, data=calib)
            qp = os.path.join(d, f"{name}_qpasses.onnx")
            export_onnx(qgm, xt[:1], qp)
            t_qp = time.perf_counter() - t
            t = time.perf_counter()
            qo = os.path.join(d, f"{name}_qpasses_onnx.onnx")
            quantize_onnx(fp32, calib, path=qo)
            t_qo = time.perf_counter() - t
            t = time.perf_counter()
            of_path = os.path.join(d, f"{name}_qpasses_ort_fusable.onnx")
            export_onnx(quantize_for_onnx(gm, calib), xt[:1], of_path)
            t_of = time.perf_counter() - t
            t = time.perf_counter()
            of7_path = os.path.join(d, f"{name}_qpasses_ort_fusable_w7.onnx")
            export_onnx(quantize_for_onnx(gm, calib, w_bits=7), xt[:1], of7_path)
            t_of7 = time.perf_counter() - t
            t = time.perf_counter()
            io_path = os.path.join(d, f"{name}_qpasses_int_only.onnx")
            export_onnx(qpasses.PassManager("int_only", integerize=False).run(gm, data=calib), xt[:1], io_path)
            t_io = time.perf_counter() - t
            fq_acc = float((qgm(xt).argmax(1) == yt).float().mean())
            models = (("fp32", fp32, None), ("ort quantize_static (QDQ, per-channel)", ort_path, t_ort),
                      ("qpasses ptq_int8 -> export_onnx", qp, t_qp),
                      ("qpasses quantize_onnx (ONNX route)", qo, t_qo),
                      ("qpasses ptq_int8 ort_fusable -> export_onnx", of_path, t_of),
                      ("qpasses ptq_int8 ort_fusable w_bits=7 -> export_onnx", of7_path, t_of7),
                      ("qpasses int_only (integerize=false) -> export_onnx", io_path, t_io))
            results = evaluate([m[1] for m in models], xt, yt, args.repeat)
            for (label, _, secs), (acc, lat, nq, size, kern) in zip(models, results):
                rows.append((name, label, acc, lat[1], lat[256], nq, size, secs, kern))
            rows.append((name, "qpasses ptq_int8 fake-quant graph (torch)", fq_acc, None, None, None, None, None, None))
    for name, r in ratios.items():
        print(f"{name}: ORT quantize_static / qpasses ptq_int8 ort_fusable latency = {r[0]:.2f} at batch 1, "
              f"{r[1]:.2f} at batch 8 (>= 1: qpasses as fast)")
    print()
    print(f"measured on a {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
          f"{datetime.date.today().isoformat()}, onnxruntime {__import__('onnxruntime').__version__}, 1 thread\n")
    print("| model | method | test acc | ORT ms (batch 1) | ORT ms (batch 256; resnet18: 8) | Q nodes | file KiB | quantize s "
          "| ORT kernels (optimised graph) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, acc, l1, l256, nq, size, secs, kern in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"| {name} | {label} | {acc:.4f} | {f(l1, '.3f')} | {f(l256, '.2f')} | {f(nq, 'd')} | "
              f"{f(None if size is None else size / 1024, '.1f')} | {f(secs, '.2f')} | {kern or '-'} |")


def run_resnet18(d: str, repeat: int, ratios) -> list:
    """fp32, quantize_static, ptq_int8 (inputs observed) and ptq_int8 ort_fusable on a ResNet-18 shape."""
    torch.manual_seed(0)
    model = resnet18()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(8)]
    xt = torch.randn(32, 3, 224, 224, generator=g)
    with torch.no_grad():
        yt = model(xt).argmax(1)
    x1 = xt[:1]
    gm = qpasses.trace(model, x1)
    fp32 = os.path.join(d, "resnet18_fp32.onnx")
    export_onnx(gm, x1, fp32)
    t = time.perf_counter()
    ort_path = os.path.join(d, "resnet18_ort.onnx")
    ort_static(fp32, ort_path, calib)
    t_ort = time.perf_counter() - t
    t = time.perf_counter()
    qp = os.path.join(d, "resnet18_qpasses.onnx")
    export_onnx(qpasses.PassManager("ptq_int8").run(gm, data=calib), x1, qp)
    t_qp = time.perf_counter() - t
    t = time.perf_counter()
    of = os.path.join(d, "resnet18_qpasses_ort_fusable.onnx")
    export_onnx(quantize_for_onnx(gm, calib), x1, of)
    t_of = time.perf_counter() - t
    rows = []
    models = (("fp32", fp32, None), ("ort quantize_static (QDQ, per-channel)", ort_path, t_ort),
              ("qpasses ptq_int8 -> export_onnx", qp, t_qp),
              ("qpasses ptq_int8 ort_fusable -> export_onnx", of, t_of))
    results = evaluate([m[1] for m in models], xt, yt, max(5, repeat // 10), sizes=(1, 8))
    for (label, _, secs), (acc, lat, nq, size, kern) in zip(models, results):
        rows.append(("resnet18", label, acc, lat[1], lat[8], nq, size, secs, kern))
    ort_lab, qp_lab = "ort quantize_static (QDQ, per-channel)", "qpasses ptq_int8 ort_fusable -> export_onnx"
    lat = {r[1]: r[3:5] for r in rows}
    ratios["resnet18"] = (lat[ort_lab][0] / lat[qp_lab][0], lat[ort_lab][1] / lat[qp_lab][1])
    return rows


if __name__ == "__main__":
    main()
