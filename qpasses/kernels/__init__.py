"""Integer kernels for lowered graphs: Triton kernels behind ``torch.library`` custom ops.

Importing this package registers the ops ``torch.ops.qpasses.{int8_linear, int8_linear_requant,
int8_conv2d, int8_conv2d_requant, int4_weight_only_linear, binary_linear, quantize_int8}`` (see
:mod:`qpasses.kernels.library`). Triton itself is imported lazily, the first time a kernel runs, so the
ops (and their CPU reference implementations) work without it.

Weights are packed once with :mod:`qpasses.kernels.packing`; the integer references live in
:mod:`qpasses.kernels.reference`. See ``docs/kernels.md``.
"""
from . import graphs, lowering, packing, reference
from .graphs import CUDAGraphRunner, cuda_graph
from .library import (SCHEMAS, binary_linear, int4_weight_only_linear, int8_conv2d, int8_conv2d_requant, int8_linear,
                  int8_linear_requant, set_triton_policy, triton_available, triton_policy, use_triton)
from .packing import (pack_bits, pack_int4, pack_int8_conv_weight, pack_int8_weight, quantize_int4, unpack_bits,
                      unpack_int4)

__all__ = [
    "graphs", "cuda_graph", "CUDAGraphRunner", "lowering", "packing", "reference", "SCHEMAS", "int8_linear", "int8_linear_requant", "int8_conv2d", "int8_conv2d_requant",
    "int4_weight_only_linear", "binary_linear", "use_triton", "triton_policy", "set_triton_policy",
    "triton_available", "pack_int8_weight", "pack_int8_conv_weight", "pack_int4", "unpack_int4", "quantize_int4",
    "pack_bits", "unpack_bits",
]
