"""Numerics: the arithmetic of quantization, in plain PyTorch (the bottom layer of qpasses).

* :mod:`.qparams` -- integer ranges, scale / zero point, quantize / dequantize / fake-quantize, SQNR;
* :mod:`.observers` -- range estimation (min-max, moving average, percentile, MSE, entropy, ACIQ);
* :mod:`.qops` -- the quantizers as ``torch.library`` custom ops (``torch.ops.qpasses.fake_quant_*``,
  ``quantize_per_token``): one graph node per quantizer, STE / LSQ gradients;
* :mod:`.fake_quant` -- the ``FakeQuantize`` module (straight-through or LSQ), calling those ops;
* :mod:`.aciq` -- analytical clipping, per-channel bit allocation, bias correction (Banner et al. 2019);
* :mod:`.rounding` -- AdaRound (Nagel et al. 2020) and GENIE-M (Jeon et al. 2023);
* :mod:`.fixed_point` -- gemmlowp integer requantization (Jacob et al. 2018).

Nothing here imports the rest of qpasses.
"""
from .aciq import aciq_alpha, aciq_mse, allocate_bits, bias_correct_weight, fit_gauss_sigma, fit_laplace_b
from .fake_quant import FakeQuantize, bits_of_range
from .fixed_point import (multiply_by_quantized_multiplier, quantize_multiplier, quantize_multiplier_tensor,
                          requantize, rounding_divide_by_pot, saturating_rounding_doubling_high_mul)
from .qops import (fake_quant_lsq_per_channel, fake_quant_lsq_per_tensor, fake_quant_per_channel,
                   fake_quant_per_group, fake_quant_per_tensor, fake_quant_per_token, quantize_per_token)
from .observers import (OBSERVERS, ACIQObserver, HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                        MSEObserver, Observer, PercentileObserver, make_observer)
from .qparams import (absmax_qparams, absmax_qparams_many, calc_qparams, calc_symmetric_qparams, dequantize,
                      dynamic_qparams, dynamic_range_qparams, fake_quantize, qrange, quantize, sqnr)
from .rounding import AdaRoundQuantizer, BetaSchedule, rectified_sigmoid

__all__ = [
    "qrange", "calc_qparams", "calc_symmetric_qparams", "absmax_qparams", "absmax_qparams_many", "quantize",
    "dequantize", "fake_quantize", "sqnr", "dynamic_qparams", "dynamic_range_qparams",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
    "HistogramObserver", "ACIQObserver", "OBSERVERS", "make_observer",
    "FakeQuantize", "bits_of_range", "qops",
    "fake_quant_per_tensor", "fake_quant_per_channel", "fake_quant_per_group", "fake_quant_lsq_per_tensor",
    "fake_quant_lsq_per_channel", "fake_quant_per_token", "quantize_per_token",
    "aciq_alpha", "aciq_mse", "fit_laplace_b", "fit_gauss_sigma", "allocate_bits", "bias_correct_weight",
    "AdaRoundQuantizer", "BetaSchedule", "rectified_sigmoid",
    "quantize_multiplier", "quantize_multiplier_tensor", "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "requantize",
]
