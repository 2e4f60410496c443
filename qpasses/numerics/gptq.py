"""GPTQ: second-order weight quantization of one layer (Frantar, Ashkboos, Hoefler and Alistarh,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022).

The layer ``y = W x`` (``W`` of shape ``[N, K]``) is quantized column by column so as to keep
``||W X - Q X||^2`` small on calibration inputs ``X`` (``[K, n]``).  The objective's Hessian with
respect to a row of ``W`` is ``H = 2 X X^T`` (the same for every row).  Quantizing column ``q``
to ``Q[:, q]`` and moving the not yet quantized columns by the optimal-brain-surgeon step

    delta = -(W[:, q] - Q[:, q]) / [H^-1]_qq * H^-1[q, :]

compensates the error as well as a quadratic model allows; the inverse Hessian of the columns
that remain is the Schur complement of ``H^-1`` without ``q``.  GPTQ's reformulation (Sec. 3 of the
paper), which this module implements:

* the columns go in a fixed order (natural, or ``act_order``: decreasing ``diag(H)``), so every
  row shares the same sequence of inverse Hessians; the rows of the upper Cholesky factor ``U``
  of ``H^-1`` (``H^-1 = U^T U``) hold exactly what those Schur complements contribute: column
  ``q``'s update is ``err_q * U[q, q:]`` with ``err_q = (W[:, q] - Q[:, q]) / U[q, q]``;
* ``H`` is damped first, ``H + damp * mean(diag H) * I``, so that the factorisation is stable;
* updates are applied lazily: inside a block of ``blocksize`` columns one column at a time, to
  the columns after the block once per block (``W[:, i2:] -= Err @ U[i1:i2, i2:]``).

Grids (what a column is rounded to): symmetric signed codes ``q`` in ``[qmin, qmax]`` with value
``q * s``, or affine unsigned codes with value ``(q - z) * s``; one scale per row (per channel)
or one per ``group_size`` consecutive columns of a row.  Group scales are either given (static:
e.g. fitted to the original weight) or fitted by ``fit`` to the current, already updated weights
of a group when its first column comes up (the paper's choice; not with ``act_order``, where
the permuted columns would no longer form contiguous groups).

Convolutions (:class:`ConvGeometry`, :func:`conv_rows`, :func:`conv_weight_matrix`) reduce to
that form through im2col: the rows of a convolution's input patches, times the flattened weight,
give its output, so ``H`` is over the patch columns.  A transposed convolution is the direct
convolution (stride 1) of its input with zeros inserted between samples (``stride - 1`` of them),
padded by ``dilation * (kernel - 1) - padding`` (plus ``output_padding`` at the end; a negative pad
crops), whose weight is the transposed one flipped in space with input and output channels
swapped inside each group (the adjoint relation of Dumoulin and Visin, "A guide to convolution
arithmetic for deep learning", 2016).  GPTQ solves for that direct weight; the map back to the
transposed layout is a permutation of entries, so it is exact.

Plain PyTorch; nothing here imports the rest of qpasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize", "quantize_column", "hessian_error",
           "symmetric_group_fit", "affine_group_fit", "round_to_nearest", "ConvGeometry", "conv_rows",
           "conv_weight_matrix", "conv_weight_from_matrix"]

#: ``fit(w [N, k]) -> (scale [N], zero [N])``: qparams for one group of columns
FitFn = Callable[[Tensor], Tuple[Tensor, Tensor]]


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tuple[Tensor, Tensor]:
    """``(value, code)``: ``code = clamp(round(w / scale) + zero, qmin, qmax)``, ``value = (code - zero) * scale``
    (division then round half to even, the arithmetic of the qpasses fake quantizers)."""
    code = torch.clamp(torch.round(w / scale) + zero, qmin, qmax)
    return (code - zero) * scale, code


def symmetric_group_fit(qmax: int) -> FitFn:
    """Symmetric qparams of a group: ``s = max|w| / qmax`` (1 for an all-zero row), ``z = 0``."""
    def fit(w: Tensor) -> Tuple[Tensor, Tensor]:
        amax = w.abs().amax(1)
        s = torch.where(amax > 0, amax / float(qmax), torch.ones_like(amax))
        return s, torch.zeros_like(s)
    return fit


def affine_group_fit(qmax: int) -> FitFn:
    """Affine qparams of a group on ``[0, qmax]`` codes: the range ``[min(w, 0), max(w, 0)]``,
    ``s = (hi - lo) / qmax`` (1 for an all-zero row), ``z = clamp(round(-lo / s), 0, qmax)``."""
    def fit(w: Tensor) -> Tuple[Tensor, Tensor]:
        lo = torch.clamp(w.amin(1), max=0.0)
        hi = torch.clamp(w.amax(1), min=0.0)
        s = torch.where(hi > lo, (hi - lo) / float(qmax), torch.ones_like(hi))
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
        return s, z
    return fit


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution reads its input, as the direct convolution GPTQ solves for.

    ``pads``: ``(before, after)`` per spatial dimension (negative: crop); ``insert``: the zero
    insertion factor per dimension (a transposed convolution's stride; 1 for a direct one);
    ``stride`` / ``dilation``: the direct convolution's (stride 1 for a transposed one).
    Hashable: layers reading one value with one geometry share a Hessian."""
    nd: int
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pads: Tuple[Tuple[int, int], ...]
    groups: int = 1
    insert: Tuple[int, ...] = ()
    transposed: bool = False

    @staticmethod
    def direct(kernel, stride, dilation, pads, groups: int = 1) -> "ConvGeometry":
        """A ``conv{n}d``: ``pads`` per dimension as ``(before, after)``."""
        nd = len(kernel)
        return ConvGeometry(nd, tuple(map(int, kernel)), tuple(map(int, stride)), tuple(map(int, dilation)),
                            tuple((int(a), int(b)) for a, b in pads), int(groups), (1,) * nd, False)

    @staticmethod
    def transpose(kernel, stride, padding, output_padding, dilation, groups: int = 1) -> "ConvGeometry":
        """A ``conv_transpose{n}d`` as its equivalent direct convolution."""
        nd = len(kernel)
        pads = []
        for k, p, op, d in zip(kernel, padding, output_padding, dilation):
            full = int(d) * (int(k) - 1)
            pads.append((full - int(p), full - int(p) + int(op)))
        return ConvGeometry(nd, tuple(map(int, kernel)), (1,) * nd, tuple(map(int, dilation)), tuple(pads),
                            int(groups), tuple(map(int, stride)), True)


def _direct_input(x: Tensor, g: ConvGeometry) -> Tensor:
    """The input of the direct convolution: zeros inserted (transposed), then padded / cropped."""
    if x.dim() == g.nd + 1:          # an unbatched input
        x = x.unsqueeze(0)
    if x.dim() != g.nd + 2:
        raise ValueError(f"a {g.nd}-d convolution reads [B, C, *{g.nd} dims], got shape {tuple(x.shape)}")
    if any(s > 1 for s in g.insert):
        size = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], g.insert)]
        z = x.new_zeros(*x.shape[:2], *size)
        z[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in g.insert)] = x
        x = z
    flat = [p for pair in reversed(g.pads) for p in pair]      # F.pad order: last dimension first
    if any(flat):
        x = F.pad(x, flat)     # negative entries crop
    return x


def conv_rows(x: Tensor, g: ConvGeometry, max_elements: int = 1 << 24) -> Iterator[Tensor]:
    """im2col of a convolution's input ``x [B, C, *spatial]`` in chunks of rows ``[m, C * prod(kernel)]``
    (at most ``max_elements`` entries each, at least one output position).

    Columns go in ``(c, k_1, ..., k_nd)`` order, so that ``rows @ conv_weight_matrix(w, g).T`` is the
    convolution's output at those positions (batch, then output positions in row-major order).
    Built from strided views (``Tensor.unfold`` per spatial dimension, then a step of ``dilation``
    inside each window): only a chunk's rows are ever materialised."""
    x = _direct_input(x, g)
    v = x
    for i, (k, s, d) in enumerate(zip(g.kernel, g.stride, g.dilation)):
        span = d * (k - 1) + 1
        if v.shape[2 + i] < span:
            raise ValueError(f"input of size {v.shape[2 + i]} in dimension {i} (after padding) is smaller than the "
                             f"kernel's span {span}")
        v = v.unfold(2 + i, span, s)[..., ::d]                      # window dimension appended last
    b, c = v.shape[:2]
    out = v.shape[2:2 + g.nd]
    nd = g.nd
    # [B, C, o_1.., k_1..] -> [B, o_1.., C, k_1..]
    perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    v = v.permute(perm)
    width = c
    for k in g.kernel:
        width *= k
    inner = 1
    for o in out[1:]:
        inner *= o
    per_slice = max(1, int(max_elements) // max(1, inner * width))     # slices of the first output dim
    for bi in range(b):
        for o1 in range(0, out[0], per_slice):
            yield v[bi, o1:o1 + per_slice].reshape(-1, width)


def conv_weight_matrix(w: Tensor, g: ConvGeometry) -> Tensor:
    """The direct convolution's weight as ``[C_out, C_in / groups * prod(kernel)]``.

    A direct weight ``[C_out, C_in / G, *k]`` is reshaped; a transposed one ``[C_in, C_out / G, *k]``
    is flipped in space and its channel axes are swapped inside each group."""
    if not g.transposed:
        return w.reshape(w.shape[0], -1)
    G = g.groups
    cin, cog = w.shape[:2]
    k = tuple(w.shape[2:])
    m = w.reshape(G, cin // G, cog, *k).transpose(1, 2).flip(tuple(range(3, 3 + g.nd)))
    return m.reshape(G * cog, -1)


def conv_weight_from_matrix(m: Tensor, w_shape, g: ConvGeometry) -> Tensor:
    """The inverse of :func:`conv_weight_matrix`: ``m`` back to a weight of shape ``w_shape``."""
    w_shape = tuple(int(s) for s in w_shape)
    if not g.transposed:
        return m.reshape(w_shape)
    G = g.groups
    cin, cog = w_shape[:2]
    k = w_shape[2:]
    t = m.reshape(G, cog, cin // G, *k).flip(tuple(range(3, 3 + g.nd))).transpose(1, 2)
    return t.reshape(w_shape)


def _expand_cols(p: Tensor, k: int, group_size: int) -> Tensor:
    """Per-row (``[N]`` / ``[N, 1]``) or per-group (``[N, G]``) qparams expanded to ``[N, k]``."""
    if p.dim() == 1:
        p = p[:, None]
    if p.shape[1] == 1:
        return p.expand(p.shape[0], k)
    gidx = torch.arange(k, device=p.device) // group_size
    return p[:, gidx]


def round_to_nearest(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, group_size: int = 0) -> Tensor:
    """Round-to-nearest values of ``w [N, K]`` on the grid of ``scale`` / ``zero`` (per row or per group)."""
    k = w.shape[1]
    s = _expand_cols(scale.to(w), k, group_size)
    z = _expand_cols(zero.to(w), k, group_size)
    return quantize_column(w, s, z, qmin, qmax)[0]


def hessian_error(w: Tensor, q: Tensor, h: Tensor) -> float:
    """The layer's output error on the calibration data ``tr((W - Q) H (W - Q)^T) / 2``
    (``= ||W X - Q X||_F^2`` for ``H = 2 X X^T``)."""
    d = (w - q).to(h.dtype)
    return float(((d @ h) * d).sum() / 2)


class HessianAccumulator:
    """``H = 2 X X^T / n`` of one layer, accumulated batch by batch in float64.

    :meth:`add` takes a batch of input rows ``x [m, K]`` (a linear layer's inputs flattened over
    the leading dimensions, or a convolution's im2col columns transposed); :meth:`all_reduce`
    sums the unnormalised ``X X^T`` and the row count over a ``torch.distributed`` group (every
    rank then holds the sums of all the data); :meth:`hessian` gives ``2 X X^T / n``.
    """

    def __init__(self, k: int, device=None, chunk_rows: int = 65536, groups: int = 1):
        self.groups = int(groups)
        self.k = int(k)
        shape = (k, k) if self.groups == 1 else (self.groups, k, k)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.n = 0
        self.chunk_rows = int(chunk_rows)

    def add(self, x: Tensor) -> None:
        """Rows ``x [m, groups * K]``; with ``groups > 1`` (a grouped convolution) group ``g``'s
        Hessian block comes from columns ``g*K .. (g+1)*K`` only."""
        if x.dim() != 2 or x.shape[1] != self.groups * self.k:
            raise ValueError(f"expected input rows of width {self.groups * self.k}, got shape {tuple(x.shape)}")
        for i in range(0, x.shape[0], self.chunk_rows):
            xc = x[i:i + self.chunk_rows].to(device=self.sum.device, dtype=torch.float64)
            if self.groups == 1:
                self.sum.addmm_(xc.T, xc)
            else:
                xg = xc.reshape(xc.shape[0], self.groups, self.k).transpose(0, 1)     # [G, m, K]
                self.sum.baddbmm_(xg.transpose(1, 2), xg)
        self.n += int(x.shape[0])

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist
        dev = self.sum.device
        if dist.get_backend(group) == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        s = self.sum.to(dev)
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=dev)
        dist.all_reduce(s, group=group)
        dist.all_reduce(n, group=group)
        self.sum = s.to(self.sum.device)
        self.n = int(n.item())

    def hessian(self, dtype=torch.float32) -> Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs were accumulated")
        return (self.sum * (2.0 / self.n)).to(dtype)


@dataclass
class GPTQResult:
    """What :func:`gptq_quantize` returns."""
    #: the quantized weight ``[N, K]`` (grid values), in the input's column order
    weight: Tensor
    #: integer codes ``[N, K]`` (float tensor holding integers), ``weight = (codes - zero) * scale``
    codes: Tensor
    #: scales ``[N, G]`` (one column per group, ``G = 1`` per channel)
    scale: Tensor
    #: zero points ``[N, G]`` in the code domain
    zero: Tensor
    #: the column order used (``act_order``), or None for the natural order
    perm: Optional[Tensor] = None
    #: columns with an all-zero Hessian diagonal (inputs never seen non-zero): set to zero
    dead: List[int] = field(default_factory=list)
    #: the damping actually added to the diagonal
    damp_value: float = 0.0


def _blocks(k: int, blocksize: int, group_size: int, lazy_groups: bool) -> List[Tuple[int, int]]:
    """Block boundaries: every ``blocksize`` columns and, with lazily fitted groups, every group
    start too, so that a group's columns are all up to date when its scale is fitted."""
    cuts = set(range(0, k, blocksize))
    if lazy_groups:
        cuts |= set(range(0, k, group_size))
    cuts = sorted(cuts) + [k]
    return list(zip(cuts[:-1], cuts[1:]))


def gptq_quantize(w: Tensor, h: Tensor, qmin: int, qmax: int, *, scale: Optional[Tensor] = None,
                  zero: Optional[Tensor] = None, group_size: int = 0, fit: Optional[FitFn] = None,
                  blocksize: int = 128, damp: float = 0.01, act_order: bool = False,
                  dtype: torch.dtype = torch.float32) -> GPTQResult:
    """Quantize ``w [N, K]`` with GPTQ against the Hessian ``h [K, K]`` (``2 X X^T / n``).

    Args:
        qmin, qmax: the code range.
        scale, zero: static qparams, ``[N]`` / ``[N, 1]`` (per row) or ``[N, G]`` (per group of
            ``group_size`` columns); ``zero`` defaults to 0.  Omit ``scale`` and give ``fit`` to
            fit each group to the current (updated) weights as its first column comes up.
        group_size: columns per group (0: per row).
        fit: ``fit(w [N, k]) -> (scale [N], zero [N])`` for lazily fitted groups.
        blocksize: columns per lazy batch (the result does not depend on it, up to rounding).
        damp: ``damp * mean(diag h)`` is added to the diagonal.
        act_order: process columns in order of decreasing ``diag(h)`` (with static qparams only
            when grouped: each column keeps its own group's scale).
        dtype: the arithmetic's dtype (float32 as in the paper; float64 for reference checks).

    Raises ``ValueError`` when the damped Hessian is not positive definite (raise ``damp``).
    """
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize needs a [N, K] weight, got shape {tuple(w.shape)}")
    n_out, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not match a weight with K={k} columns")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    grouped = group_size > 0
    lazy = scale is None
    if lazy and (fit is None or not grouped):
        raise ValueError("give static qparams (scale=...), or group_size > 0 with fit= for lazily fitted groups")
    if lazy and act_order:
        raise ValueError("act_order needs static group qparams (scale=...): permuted columns do not form groups")
    dev = w.device
    W = w.detach().to(dtype).clone()
    H = h.detach().to(device=dev, dtype=dtype).clone()
    dead_mask = torch.diag(H) == 0
    dead = [int(i) for i in torch.nonzero(dead_mask).flatten().tolist()]
    if dead:
        H[dead_mask, dead_mask] = 1.0
        W[:, dead_mask] = 0.0

    n_groups = (k + group_size - 1) // group_size if grouped else 1
    if lazy:
        S = torch.ones(n_out, n_groups, dtype=dtype, device=dev)
        Z = torch.zeros(n_out, n_groups, dtype=dtype, device=dev)
    else:
        S = scale.detach().to(device=dev, dtype=dtype).reshape(n_out, -1).clone()
        Z = (torch.zeros_like(S) if zero is None else zero.detach().to(device=dev, dtype=dtype).reshape(n_out, -1).clone())
        if S.shape[1] not in (1, n_groups) or Z.shape != S.shape:
            raise ValueError(f"scale / zero of shape {tuple(S.shape)} / {tuple(Z.shape)} fit neither per-row nor "
                             f"{n_groups} groups of {group_size}")
    col_group = (torch.arange(k, device=dev) // group_size) if (grouped and S.shape[1] > 1) else \
        torch.zeros(k, dtype=torch.long, device=dev)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        col_group = col_group[perm]

    mean_diag = float(torch.mean(torch.diag(H)))
    dv = float(damp) * mean_diag
    idx = torch.arange(k, device=dev)
    H[idx, idx] += dv
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}): raise damp")
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise ValueError(f"the inverse Hessian is not positive definite in {dtype} (damp={damp}): raise damp")
    del H, Hinv, L

    Q = torch.zeros_like(W)
    C = torch.zeros_like(W)
    groups_of = col_group.tolist()
    for i1, i2 in _blocks(k, int(blocksize), int(group_size), lazy):
        if lazy and i1 % group_size == 0:
            s, z = fit(W[:, i1:i1 + group_size])
            S[:, i1 // group_size] = s.to(dtype)
            Z[:, i1 // group_size] = z.to(dtype)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        C1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            g = groups_of[i1 + i]
            wcol = W1[:, i]
            qcol, ccol = quantize_column(wcol, S[:, g], Z[:, g], qmin, qmax)
            Q1[:, i] = qcol
            C1[:, i] = ccol
            err = (wcol - qcol) / U1[i, i]
            # the OBS step of this column on the rest of the block (column i itself lands on qcol)
            W1[:, i:].sub_(torch.outer(err, U1[i, i:]))
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        C[:, i1:i2] = C1
        if i2 < k:   # the lazy update of everything after the block
            W[:, i2:].sub_(E1 @ U[i1:i2, i2:])

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        C = C[:, inv]
    return GPTQResult(Q.to(w.dtype) if w.is_floating_point() else Q, C, S, Z, perm, dead, dv)
