"""Replay a lowered model as one CUDA graph.

A lowered graph calls one ``torch.library`` op per quantized layer (plus the activation
quantizers between them). Each call costs tens of microseconds of Python and launch work on the
host, which at small batch is more than the kernel itself: eager execution then leaves the GPU
idle between kernels. Capturing the whole forward pass once as a CUDA graph
(``torch.cuda.CUDAGraph``) and replaying it removes that host cost -- the same remedy as
``torch.compile(mode="reduce-overhead")`` or TensorRT's engines.

The captured graph has fixed input shapes and reuses one output buffer, like every CUDA-graph
runner: inputs are copied into static buffers before each replay, and the returned tensors are
overwritten by the next call (``clone()`` them to keep them).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["CUDAGraphRunner", "cuda_graph"]


class CUDAGraphRunner:
    """``fn(*example_inputs)`` captured as a CUDA graph; call it with tensors of the same shapes,
    dtypes and devices. See the module docstring for the buffer-reuse caveat."""

    def __init__(self, fn: Callable, example_inputs: Sequence[torch.Tensor], warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph needs a CUDA device")
        self.fn = fn
        self.static_inputs = [t.detach().clone() for t in example_inputs]
        for t in self.static_inputs:
            if not (isinstance(t, torch.Tensor) and t.is_cuda):
                raise ValueError("cuda_graph: every example input must be a CUDA tensor")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(max(1, warmup)):       # runs the Triton autotuners outside the capture
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for buf, x in zip(self.static_inputs, inputs):
            if x.shape != buf.shape or x.dtype != buf.dtype:
                raise ValueError(f"captured for {tuple(buf.shape)} {buf.dtype}, got {tuple(x.shape)} {x.dtype}")
            buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_output


def cuda_graph(fn: Callable, *example_inputs: torch.Tensor, warmup: int = 3) -> CUDAGraphRunner:
    """Capture ``fn`` (e.g. a lowered GraphModule already moved to the GPU) for inputs shaped like
    ``example_inputs``. Example::

        low = PassManager(["ptq_int8", "lower"]).run(gm, data=calib).cuda()
        run = qpasses.kernels.cuda_graph(low, x.cuda())
        y = run(x.cuda())            # one graph replay; y is overwritten by the next call
    """
    return CUDAGraphRunner(fn, example_inputs, warmup=warmup)
