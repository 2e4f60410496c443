"""Observers: modules that watch the values flowing through them and choose quantization ranges.

Every observer's ``forward(x)`` records statistics of ``x.detach()`` (no autograd graph, no
effect on the values) and returns ``x`` unchanged; :meth:`Observer.calculate_qparams` turns the
statistics into ``(scale, zero_point)`` via :func:`~qpasses.numerics.calc_qparams`.

State lives in buffers, so ``state_dict`` / ``load_state_dict`` and ``copy.deepcopy`` carry it;
buffers whose size depends on the data (per-channel ranges, sample reservoirs, histograms)
are resized on ``load_state_dict``.

==================  ==================================================================  ============
key                 range                                                               per-channel
==================  ==================================================================  ============
``minmax``          running min / max                                                   yes
``moving_average``  exponential moving average of per-batch min / max                   yes
``percentile``      percentiles of a bounded random sample of the data                  yes
``mse``             ``[a*min, a*max]`` with ``a`` minimising the quantization MSE       yes
``entropy``         KL-optimal threshold on a fixed-bin histogram (TensorRT)            no
``aciq``            analytical clipping for a Laplace / Gaussian prior (Banner 2019)    yes
==================  ==================================================================  ============
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn as nn

from .aciq import _prior, aciq_alpha, fit_gauss_sigma, fit_laplace_b
from ._module import add_buffers
from .qparams import calc_qparams, qrange

__all__ = ["Observer", "calculate_qparams_many", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver",
           "MSEObserver", "HistogramObserver", "ACIQObserver", "OBSERVERS", "make_observer", "sync_observers",
           "distributed_refusal"]


def _empty(dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(0, dtype=dtype)


class Observer(nn.Module):
    """Base observer: tracks the running minimum and maximum of everything it sees.

    Args:
        bits: integer bit-width of the quantized values.
        symmetric: symmetric range (zero point 0 for signed, mid code for unsigned).
        signed: signed integer range; defaults to ``symmetric``.
        axis: ``None`` for one range per tensor, an int for one range per channel along that axis.
        narrow: drop the most negative code of a signed range (``[-127, 127]``), see :func:`qrange`.

    Attributes ``bits, symmetric, signed, axis, narrow, qmin, qmax``; buffers ``min_val`` /
    ``max_val`` (shape ``[]`` per-tensor or ``[C]`` per-channel, empty before any data). The base
    class chooses the min-max range; subclasses override :meth:`_range` (and :meth:`_observe`).
    """

    per_channel_supported = True

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False):
        super().__init__()
        bits = int(bits)
        signed = bool(symmetric) if signed is None else bool(signed)
        qmin, qmax = qrange(bits, signed, bool(narrow))
        # plain attributes straight into __dict__: on a fresh module that is what
        # nn.Module.__setattr__ does, at a fraction of its cost (graphs hold thousands of observers)
        self.__dict__.update(bits=bits, symmetric=bool(symmetric), signed=signed,
                             axis=None if axis is None else int(axis), narrow=bool(narrow), qmin=qmin, qmax=qmax,
                             _batches=0)
        if self.axis is not None and not self.per_channel_supported:
            raise ValueError(f"{type(self).__name__} is per-tensor only (got axis={self.axis})")
        add_buffers(self, min_val=_empty(), max_val=_empty())

    # ------------------------------------------------------------------ state
    @property
    def has_data(self) -> bool:
        """True once at least one non-empty tensor has been observed."""
        return self.min_val.numel() > 0

    def reset(self) -> None:
        """Forget everything observed so far (buffers become empty)."""
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = torch.zeros(0, dtype=buf.dtype, device=buf.device)
        self._batches = 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # data-dependent buffer shapes: adopt the saved shapes before loading
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.zeros(state_dict[key].shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        """``bits=..., symmetric=..., signed=..., axis=..., qmin=..., qmax=...``."""
        s = (f"bits={self.bits}, symmetric={self.symmetric}, signed={self.signed}, axis={self.axis}, "
             f"qmin={self.qmin}, qmax={self.qmax}")
        return s + (", narrow=True" if self.narrow else "")

    # ------------------------------------------------------------------ observing
    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a float32 ``[C, n]`` matrix (``C = 1`` per-tensor)."""
        x = x.to(torch.float32)
        if self.axis is None:
            return x.reshape(1, -1)
        if x.dim() == 0:
            raise ValueError(f"per-channel observer (axis={self.axis}) got a 0-d tensor")
        ax = self.axis % x.dim()
        return x.movedim(ax, 0).reshape(x.shape[ax], -1)

    def _shape(self, v: torch.Tensor) -> torch.Tensor:
        """``[C]`` statistics -> buffer shape (``[]`` per-tensor)."""
        return v.reshape(()) if self.axis is None else v.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of ``x`` (detached) and return ``x`` unchanged."""
        if not isinstance(x, torch.Tensor) or x.numel() == 0 or not x.is_floating_point():
            return x
        with torch.no_grad():
            v = self._channels(x.detach())
            if self.has_data and v.shape[0] != self.min_val.reshape(-1).shape[0]:
                raise ValueError(f"{type(self).__name__}: {v.shape[0]} channels along axis {self.axis}, "
                                 f"previously {self.min_val.reshape(-1).shape[0]}")
            self._observe(v)
            self.__dict__["_batches"] += 1  # a plain attribute: nn.Module.__setattr__ is slow
        return x

    def _update_minmax(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._shape(v.amin(dim=1)), self._shape(v.amax(dim=1))
        buf = self._buffers  # registered buffers, replaced in the dict (nn.Module.__setattr__ is slow)
        if self.has_data:
            buf["min_val"] = torch.minimum(buf["min_val"], lo)
            buf["max_val"] = torch.maximum(buf["max_val"], hi)
        else:
            buf["min_val"], buf["max_val"] = lo, hi
        return lo, hi

    def _observe(self, v: torch.Tensor) -> None:
        """Update the statistics with a ``[C, n]`` float32 batch."""
        self._update_minmax(v)

    # ------------------------------------------------------------------ qparams
    def _range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(lo, hi)`` chosen from the statistics."""
        return self.min_val, self.max_val

    def calculate_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The real range ``(lo, hi)`` this observer maps onto ``[qmin, qmax]`` (before 0 is included)."""
        if not self.has_data:
            raise RuntimeError("observer has seen no data")
        return self._range()

    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` -- float32 / int32, shape ``[]`` or ``[C]``.

        Raises ``RuntimeError("observer has seen no data")`` before the first observation.
        """
        lo, hi = self.calculate_range()
        return calc_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)


def calculate_qparams_many(observers: Iterable[Observer]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """``{id(obs): obs.calculate_qparams()}`` for many observers, in one vectorised pass per group.

    Only observers that use the base min-max rule (:class:`MinMaxObserver`,
    :class:`MovingAverageMinMaxObserver`), have seen data and have a finite range are
    included; observers of one group share the integer range, symmetry and statistics
    shape.  :func:`calc_qparams` is elementwise, so the results are bit-identical to each
    observer's own ``calculate_qparams()``; they are views of one tensor per group (clone
    them to keep them).  Graphs with thousands of observers convert several times faster.
    """
    groups: Dict[tuple, list] = {}
    for o in observers:
        t = type(o)
        if t.calculate_qparams is not Observer.calculate_qparams or t._range is not Observer._range:
            continue
        lo, hi = o.min_val, o.max_val
        if lo.numel() == 0:
            continue
        key = (o.qmin, o.qmax, o.symmetric, lo.shape, hi.shape, lo.dtype, hi.dtype, lo.device, hi.device)
        groups.setdefault(key, []).append(o)
    out: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    for (qmin, qmax, symmetric, *_), obs in groups.items():
        lo = torch.stack([o.min_val for o in obs])
        hi = torch.stack([o.max_val for o in obs])
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        if finite.dim() > 1:
            finite = finite.reshape(len(obs), -1).all(1)
        scale, zp = calc_qparams(lo, hi, qmin, qmax, symmetric)
        for o, s, z, ok in zip(obs, scale.unbind(0), zp.unbind(0), finite.tolist()):
            if ok:  # a non-finite range (an error downstream) is left to the per-observer path
                out[id(o)] = (s, z)
    return out


class MinMaxObserver(Observer):
    """Range = running ``[min, max]`` of every value seen (per tensor or per channel)."""


class MovingAverageMinMaxObserver(Observer):
    """Range = exponential moving average of the per-batch min and max.

    The first batch initialises the averages; every later batch moves them by
    ``averaging_constant * (batch_stat - average)``. Less sensitive to rare outlier batches than
    :class:`MinMaxObserver` (Jacob et al. 2018 use it for activation ranges during QAT).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False, averaging_constant: float = 0.01):
        super().__init__(bits, symmetric, signed, axis, narrow)
        if not 0.0 < float(averaging_constant) <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)

    def _observe(self, v: torch.Tensor) -> None:
        lo, hi = self._shape(v.amin(dim=1)), self._shape(v.amax(dim=1))
        buf = self._buffers
        if self.has_data:
            c = self.averaging_constant
            buf["min_val"] = buf["min_val"] + c * (lo - buf["min_val"])
            buf["max_val"] = buf["max_val"] + c * (hi - buf["max_val"])
        else:
            buf["min_val"], buf["max_val"] = lo, hi

    def extra_repr(self) -> str:
        return super().extra_repr() + f", averaging_constant={self.averaging_constant}"


class _SampleObserver(Observer):
    """An observer that also keeps a bounded, approximately uniform random sample of the data.

    The reservoir (buffer ``samples``, ``[C, K]``) is maintained with weighted reservoir sampling
    (Efraimidis & Spirakis 2006, "A-Res"): every batch contributes at most ``K`` randomly chosen
    columns, each weighted by how many values it stands for, and the ``K`` columns with the
    largest keys ``log(u) / w`` survive. Memory is ``O(max_samples)`` whatever the data size.
    The per-batch random stream is seeded from ``seed`` and the batch count, so results are
    reproducible and the global RNG is untouched.
    """

    default_max_samples = 1 << 18

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False, max_samples: Optional[int] = None,
                 seed: int = 0):
        super().__init__(bits, symmetric, signed, axis, narrow)
        self.max_samples = int(max_samples or self.default_max_samples)
        if self.max_samples < 1:
            raise ValueError("max_samples must be positive")
        self.seed = int(seed)
        self.register_buffer("samples", _empty())
        self.register_buffer("sample_keys", _empty())

    def _capacity(self, channels: int) -> int:
        return max(self.max_samples // channels, min(1024, self.max_samples))

    def _observe(self, v: torch.Tensor) -> None:
        self._update_minmax(v)
        C, n = v.shape
        k = self._capacity(C)
        g = torch.Generator(device=v.device)
        g.manual_seed(self.seed * 1_000_003 + self._batches)
        if n <= k:
            cols, weight = v, 1.0
        else:
            idx = torch.randint(0, n, (k,), generator=g, device=v.device)
            cols, weight = v[:, idx], n / k
        u = torch.rand(cols.shape[1], generator=g, device=v.device, dtype=torch.float64)
        keys = (torch.log(u.clamp_min(1e-300)) / weight).to(torch.float32)
        if self.samples.numel():
            cols = torch.cat([self.samples, cols], dim=1)
            keys = torch.cat([self.sample_keys, keys])
        if keys.numel() > k:
            top = torch.topk(keys, k).indices
            cols, keys = cols[:, top], keys[top]
        self.samples, self.sample_keys = cols.contiguous(), keys.contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_samples={self.max_samples}"


def _quantile_rows(v: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise ``q``-quantile with linear interpolation (``torch.quantile``'s default), by sorting
    (no size limit, unlike ``torch.quantile``)."""
    s = torch.sort(v, dim=1).values
    pos = q * (s.shape[1] - 1)
    i = int(math.floor(pos))
    j = min(i + 1, s.shape[1] - 1)
    frac = pos - i
    return s[:, i] + (s[:, j] - s[:, i]) * frac


class PercentileObserver(_SampleObserver):
    """Range = percentiles of the observed values (clips the rare tails).

    ``hi`` is the ``percentile``-th and ``lo`` the ``(100 - percentile)``-th percentile of a
    bounded random sample (``max_samples`` values, see :class:`_SampleObserver`); for a
    symmetric range, ``hi = -lo`` is the ``percentile``-th percentile of ``|x|``. Works per
    tensor and per channel (``K = max_samples / C`` values per channel).
    """

    default_max_samples = 1 << 20

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False, percentile: float = 99.99,
                 max_samples: Optional[int] = None, seed: int = 0):
        super().__init__(bits, symmetric, signed, axis, narrow, max_samples, seed)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _range(self):
        s = self.samples
        q = self.percentile / 100.0
        if self.symmetric:
            hi = _quantile_rows(s.abs(), q)
            return self._shape(-hi), self._shape(hi)
        return self._shape(_quantile_rows(s, 1.0 - q)), self._shape(_quantile_rows(s, q))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}"


def _fq_rows(v: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize a ``[C, n]`` matrix with per-row parameters (same arithmetic as torch)."""
    s = scale.reshape(-1, 1)
    z = zp.reshape(-1, 1).to(torch.float32)
    q = torch.clamp(torch.round(v * (1.0 / s)) + z, qmin, qmax)
    return (q - z) * s


class MSEObserver(_SampleObserver):
    """Range = ``[a * min, a * max]`` with ``a`` on a grid minimising the quantization MSE.

    ``a`` runs over ``{1/grid, 2/grid, ..., 1}``; for each candidate the seen data (a bounded
    random sample of it, exact for tensors smaller than ``max_samples``, e.g. weights) is
    fake-quantized with the resulting ``(scale, zero_point)`` and the mean squared error is
    measured. Per channel, ``a`` is chosen independently for every channel. Ties keep the
    widest range. (Range search by quantization error, e.g. Nagel et al., "A White Paper on
    Neural Network Quantization", 2021, sec. 3.4; Banner et al. 2019.)
    """

    default_max_samples = 1 << 17

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False, grid: int = 100,
                 max_samples: Optional[int] = None, seed: int = 0):
        super().__init__(bits, symmetric, signed, axis, narrow, max_samples, seed)
        if int(grid) < 1:
            raise ValueError("grid must be >= 1")
        self.grid = int(grid)

    def _range(self):
        v = self.samples
        lo_all = self.min_val.reshape(-1)
        hi_all = self.max_val.reshape(-1)
        best_err = torch.full_like(lo_all, math.inf)
        best_a = torch.ones_like(lo_all)
        for i in range(self.grid, 0, -1):  # widest first: strict improvement keeps the widest on ties
            a = i / self.grid
            scale, zp = calc_qparams(lo_all * a, hi_all * a, self.qmin, self.qmax, self.symmetric)
            err = (_fq_rows(v, scale, zp, self.qmin, self.qmax) - v).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a = torch.where(better, torch.full_like(best_a, a), best_a)
        return self._shape(lo_all * best_a), self._shape(hi_all * best_a)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grid={self.grid}"


class HistogramObserver(Observer):
    """Entropy calibration (TensorRT, Migacz 2017, "8-bit Inference with TensorRT"), per tensor.

    Keeps a histogram of ``|x|`` over ``[0, hist_max]`` with ``bins`` fixed bins. When a batch
    exceeds ``hist_max``, the range is multiplied by the smallest power of two that covers it and
    the histogram is re-binned exactly by merging groups of adjacent bins.

    The threshold ``T`` minimises ``KL(P || Q)`` over candidate ``T = i * bin_width``: ``P`` is
    the histogram up to ``T`` with all the mass beyond ``T`` added to its last bin (clipping), and
    ``Q`` is that part of the histogram merged into as many intervals as there are quantization
    levels on ``[0, T]`` and spread back uniformly over the originally non-empty bins. The range
    is ``[0, T]`` for non-negative data quantized asymmetrically (all ``2**bits`` levels), else
    ``[-T, T]`` (``2**(bits-1)`` levels per side) intersected with the observed ``[min, max]``.
    If the histogram is too coarse for the number of levels, the full range is used.
    """

    per_channel_supported = False

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False, bins: int = 2048):
        super().__init__(bits, symmetric, signed, axis, narrow)
        if int(bins) < 2 or int(bins) & (int(bins) - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = int(bins)
        if self.bits < 6:
            warnings.warn(f"entropy (KL) calibration at {self.bits} bits: KL over the clipped histogram does not "
                          f"weigh the clipping error, and with few levels it can pick a far too small range; "
                          f"prefer the 'mse' or 'percentile' observer below 6 bits", stacklevel=2)
        self.register_buffer("histogram", _empty(torch.float64))
        self.register_buffer("hist_max", _empty())

    def start_grid(self, top: float) -> None:
        """Start an empty histogram on ``[0, top]`` (instead of the first batch's ``max |x|``).

        Distributed calibration gives every rank the grid of the first batch of rank 0 (the
        global first batch), so that each rank's grid is that one times a power of two and the
        histograms merge exactly (:func:`sync_observers`).
        """
        if self.histogram.numel():
            raise RuntimeError("start_grid on a histogram that has already seen data")
        top = float(top) if float(top) > 0 else 1e-8
        self.hist_max = torch.tensor(top, dtype=torch.float32, device=self.min_val.device)
        self.histogram = torch.zeros(self.bins, dtype=torch.float64, device=self.min_val.device)

    def _rebin(self, top: float) -> None:
        """Re-bin the histogram onto ``[0, top]`` (``top >= hist_max``): exact when ``top / hist_max``
        is a power of two (groups of bins merge), else each bin's count moves to the bin holding
        its centre (an approximation)."""
        cur = float(self.hist_max)
        if top <= cur:
            return
        h = self.histogram
        ratio = top / cur
        f = 1 << max(0, round(math.log2(ratio)))
        if cur * f == top:
            merged = self._fold_bins(h, f)
        else:
            centres = (torch.arange(self.bins, dtype=torch.float64, device=h.device) + 0.5) * (cur / self.bins)
            idx = torch.clamp((centres / (top / self.bins)).to(torch.int64), 0, self.bins - 1)
            merged = torch.zeros_like(h).index_add_(0, idx, h)
        self.histogram = merged
        self.hist_max = torch.tensor(top, dtype=torch.float32, device=h.device)

    def _fold_bins(self, h: torch.Tensor, f: int) -> torch.Tensor:
        """The histogram ``h`` on a grid ``f`` (a power of two) times wider: each run of ``f``
        bins summed into one, the top bins empty (exact)."""
        if f >= self.bins:
            merged = torch.zeros_like(h)
            merged[0] = h.sum()
            return merged
        return torch.cat([h.reshape(self.bins // f, f).sum(dim=1),
                          torch.zeros(self.bins - self.bins // f, dtype=h.dtype, device=h.device)])

    def _observe(self, v: torch.Tensor) -> None:
        self._update_minmax(v)
        a = v.reshape(-1).abs()
        amax = float(a.max())
        if not math.isfinite(amax):
            raise ValueError("HistogramObserver got non-finite values")
        if self.histogram.numel() == 0:
            top = amax if amax > 0 else 1e-8
            self.hist_max = torch.tensor(top, dtype=torch.float32, device=v.device)
            self.histogram = torch.zeros(self.bins, dtype=torch.float64, device=v.device)
        top = float(self.hist_max)
        if amax > top:
            f = 1 << max(0, math.ceil(math.log2(amax / top)))
            while top * f < amax:  # float rounding guard
                f *= 2
            self.histogram = self._fold_bins(self.histogram, f)
            top = top * f
            self.hist_max = torch.tensor(top, dtype=torch.float32, device=v.device)
        width = top / self.bins
        idx = torch.clamp((a / width).to(torch.int64), 0, self.bins - 1)
        self.histogram = self.histogram + torch.bincount(idx, minlength=self.bins).to(torch.float64)

    def _levels(self) -> int:
        one_sided = float(self.min_val) >= 0.0 and not self.symmetric
        span = self.qmax - self.qmin
        return max(1, span if one_sided else span // 2)

    def _threshold(self) -> float:
        hist = self.histogram.cpu().numpy()
        width = float(self.hist_max) / self.bins
        nq = self._levels()
        nz = np.nonzero(hist)[0]
        if nz.size == 0:
            return 0.0
        last = int(nz[-1]) + 1  # thresholds beyond the last non-empty bin change nothing
        if nq >= last:
            return last * width
        cum = np.concatenate([[0.0], np.cumsum(hist)])
        total = cum[-1]
        best_i, best_kl = last, math.inf
        for i in range(nq, last + 1):
            p = hist[:i].copy()
            p[i - 1] += total - cum[i]
            chunk = (np.arange(i) * nq) // i
            nonzero = hist[:i] > 0
            sums = np.bincount(chunk, weights=hist[:i], minlength=nq)
            counts = np.bincount(chunk, weights=nonzero.astype(np.float64), minlength=nq)
            q = np.where(nonzero, sums[chunk] / np.maximum(counts[chunk], 1.0), 0.0)
            mask = p > 0
            pp = p[mask] / p.sum()
            qq = q[mask]
            qs = q.sum()
            if qs <= 0:
                continue
            qq = np.maximum(qq / qs, 1e-12)  # p > 0 where q == 0: only the clipped last bin can be
            kl = float(np.sum(pp * np.log(pp / qq)))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i * width

    def _range(self):
        t = self._threshold()
        dev = self.min_val.device
        lo, hi = float(self.min_val), float(self.max_val)
        if lo >= 0.0 and not self.symmetric:
            r = (0.0, min(hi, t))
        else:
            r = (max(lo, -t), min(hi, t))
        return torch.tensor(r[0], device=dev), torch.tensor(r[1], device=dev)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}"


class ACIQObserver(_SampleObserver):
    """Analytical clipping (ACIQ, Banner et al. 2019) for a Laplace or Gaussian prior.

    The scale parameter (Laplace ``b = E|x - E x|`` or Gaussian ``sigma``) is fitted on a bounded
    random sample of the data; the clipping value is ``alpha = aciq_alpha(M, prior, b)``:

    * two-sided data: range ``[mu - alpha, mu + alpha]`` with ``mu`` the mean and
      ``M = log2(qmax - qmin + 1)`` bits;
    * non-negative data (e.g. after ReLU) quantized asymmetrically: a half-Laplace / half-normal
      with ``b = E x`` (``sigma = sqrt(E x^2)``); all ``2**bits`` levels cover ``[0, alpha]``,
      which has the same step as ``2**(bits+1)`` levels on ``[-alpha, alpha]``, so
      ``M = log2(qmax - qmin + 1) + 1``.

    The range is intersected with the observed ``[min, max]``. Works per tensor and per channel.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: Optional[bool] = None,
                 axis: Optional[int] = None, narrow: bool = False, prior: str = "laplace",
                 max_samples: Optional[int] = None, seed: int = 0):
        super().__init__(bits, symmetric, signed, axis, narrow, max_samples, seed)
        self.prior = _prior(prior)

    def _range(self):
        v = self.samples
        lo_obs, hi_obs = self.min_val.reshape(-1), self.max_val.reshape(-1)
        levels = self.qmax - self.qmin + 1
        one_sided = (lo_obs >= 0) & (not self.symmetric)
        # two-sided fit around the mean
        mu = v.mean(dim=1)
        if self.prior == "laplace":
            p2 = fit_laplace_b(v, axis=0)
            p1 = v.abs().mean(dim=1)
        else:
            p2 = fit_gauss_sigma(v, axis=0)
            p1 = v.pow(2).mean(dim=1).sqrt()
        a2 = aciq_alpha(math.log2(levels), self.prior, p2)
        a1 = aciq_alpha(math.log2(levels) + 1.0, self.prior, p1)
        lo = torch.where(one_sided, torch.zeros_like(mu), torch.maximum(mu - a2, lo_obs))
        hi = torch.where(one_sided, torch.minimum(a1, hi_obs), torch.minimum(mu + a2, hi_obs))
        return self._shape(lo), self._shape(hi)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prior={self.prior!r}"


OBSERVERS: Dict[str, Type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": HistogramObserver,
    "histogram": HistogramObserver,
    "aciq": ACIQObserver,
}

#: argument declarations shared by every action that takes an observer kind or a bit-width
#: (qpasses.lang.registry): declared once, here, from the table above
OBSERVER_KIND = {"choices": tuple(OBSERVERS)}
BITS = {"min": 2, "max": 16}


def distributed_refusal(obs: Observer) -> Optional[str]:
    """Why ``obs`` cannot calibrate data-parallel (None: it can).

    A moving average depends on the order of the batches: no reduction of per-rank averages
    equals the average one process would compute over all of them.
    """
    if isinstance(obs, MovingAverageMinMaxObserver):
        return (f"{type(obs).__name__} (observer 'moving_average') cannot calibrate data-parallel: an exponential "
                f"moving average depends on the order of the batches, and no reduction of the ranks' averages gives "
                f"the average of one process; use 'minmax' or 'entropy' (exact) or a sample-based observer")
    return None


def _dist_device(group=None) -> torch.device:
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_observers(observers: Sequence[Observer], group=None) -> None:
    """Merge the statistics of the same observers on every rank of a ``torch.distributed`` group.

    Every rank must call it with its observers in the same order (the same graph gives the same
    order). Afterwards every rank holds the same state:

    * min / max: element-wise MIN / MAX all-reduce -- exactly what one process seeing the data of
      all ranks holds;
    * histograms (``entropy``): ranges all-reduced (MAX), each rank re-binned onto the common
      range, counts summed -- exact when the ranks' ranges differ by powers of two, as the
      ``calibrate`` step arranges (:meth:`HistogramObserver.start_grid`);
    * reservoir samples (``percentile``, ``mse``, ``aciq``): the ranks' reservoirs are gathered and
      the ``K`` largest keys kept -- a weighted random sample of all the data, as one process's
      is, but not the same sample (a statistical, not bit-exact, agreement);
    * moving averages are refused (:func:`distributed_refusal`, ``ValueError``).

    Ranks that saw no data for an observer take part with empty statistics.
    """
    import torch.distributed as dist
    observers = list(observers)
    for o in observers:
        why = distributed_refusal(o)
        if why:
            raise ValueError(why)
    if not observers:
        return
    size = dist.get_world_size(group)
    dev = _dist_device(group)
    # 1. how many channels each observer has (0 on a rank that saw nothing), and batch counts
    meta = torch.tensor([[o.min_val.numel(), o._batches] for o in observers], dtype=torch.float64, device=dev)
    chans = meta[:, 0].clone()
    dist.all_reduce(chans, op=dist.ReduceOp.MAX, group=group)
    batches = meta[:, 1].clone()
    dist.all_reduce(batches, op=dist.ReduceOp.SUM, group=group)
    chans_l = [int(c) for c in chans.tolist()]
    # 2. min / max
    los, his = [], []
    for o, c in zip(observers, chans_l):
        if o.min_val.numel():
            los.append(o.min_val.reshape(-1).float().to(dev))
            his.append(o.max_val.reshape(-1).float().to(dev))
        else:
            los.append(torch.full((c,), math.inf, device=dev))
            his.append(torch.full((c,), -math.inf, device=dev))
    lo, hi = torch.cat(los), torch.cat(his)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    off = 0
    for o, c, b in zip(observers, chans_l, batches.tolist()):
        if c:
            buf_dev = o.min_val.device if o.min_val.numel() else torch.device("cpu")
            shape = (lambda t: t.reshape(()) if o.axis is None else t.reshape(-1))
            o._buffers["min_val"] = shape(lo[off:off + c].to(buf_dev))
            o._buffers["max_val"] = shape(hi[off:off + c].to(buf_dev))
        off += c
        o.__dict__["_batches"] = int(b)
    # 3. histograms
    hists = [o for o, c in zip(observers, chans_l) if isinstance(o, HistogramObserver) and c]
    if hists:
        tops = torch.tensor([float(o.hist_max) if o.hist_max.numel() else 0.0 for o in hists], dtype=torch.float32,
                            device=dev)
        dist.all_reduce(tops, op=dist.ReduceOp.MAX, group=group)
        parts = []
        for o, top in zip(hists, tops.tolist()):
            if o.histogram.numel() == 0:
                o.start_grid(top)
            else:
                o._rebin(top)
            parts.append(o.histogram.to(dev))
        counts = torch.cat(parts)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        for i, o in enumerate(hists):
            o.histogram = counts[i * o.bins:(i + 1) * o.bins].to(o.hist_max.device).clone()
    # 4. reservoirs
    samp = [(o, c) for o, c in zip(observers, chans_l) if isinstance(o, _SampleObserver) and c]
    if samp:
        ks = torch.tensor([o.sample_keys.numel() for o, _ in samp], dtype=torch.int64, device=dev)
        all_ks = [torch.zeros_like(ks) for _ in range(size)]
        dist.all_gather(all_ks, ks, group=group)
        kmax = torch.stack(all_ks).amax(0).tolist()
        flat_cols, flat_keys = [], []
        for (o, c), km in zip(samp, kmax):
            cols = torch.zeros(c, km, device=dev)
            keys = torch.full((km,), -math.inf, device=dev)
            n = o.sample_keys.numel()
            if n:
                cols[:, :n] = o.samples.to(dev)
                keys[:n] = o.sample_keys.to(dev)
            flat_cols.append(cols.reshape(-1))
            flat_keys.append(keys)
        cols_t, keys_t = torch.cat(flat_cols), torch.cat(flat_keys)
        g_cols = [torch.empty_like(cols_t) for _ in range(size)]
        g_keys = [torch.empty_like(keys_t) for _ in range(size)]
        dist.all_gather(g_cols, cols_t, group=group)
        dist.all_gather(g_keys, keys_t, group=group)
        coff = koff = 0
        for (o, c), km in zip(samp, kmax):
            cols = torch.cat([gc[coff:coff + c * km].reshape(c, km) for gc in g_cols], dim=1)
            keys = torch.cat([gk[koff:koff + km] for gk in g_keys])
            coff += c * km
            koff += km
            valid = torch.isfinite(keys)
            cols, keys = cols[:, valid], keys[valid]
            k = o._capacity(c)
            if keys.numel() > k:
                top = torch.topk(keys, k).indices
                cols, keys = cols[:, top], keys[top]
            home = o.min_val.device
            o.samples, o.sample_keys = cols.contiguous().to(home), keys.contiguous().to(home)


def make_observer(kind: str, **kwargs) -> Observer:
    """Build an observer by name (a key of :data:`OBSERVERS`) with keyword arguments.

    Raises ``ValueError`` for an unknown name (listing the valid ones); bad keyword arguments
    raise the constructor's ``TypeError`` / ``ValueError``.
    """
    try:
        cls = OBSERVERS[str(kind)]
    except KeyError:
        raise ValueError(f"unknown observer {kind!r}; choose one of {', '.join(sorted(OBSERVERS))}") from None
    return cls(**kwargs)
