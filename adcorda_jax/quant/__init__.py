"""Weight and activation quantization of the library's classifiers, without rewriting them.

    spec = quant_spec_from_config(config.model.quant)          # None when weight_bits == 0
    variables = fold_batch_norm(variables)                      # optional, for inference
    weight_scales = calibrate_weights(variables['params'], spec, method='mse')
    apply = quantized_apply_fn(model, spec, weight_scales)      # same signature as model.apply
    logits_fn = quantized_logits_fn(model, spec, weight_scales, straight_through=False)  # BPDA
    exported = export_integer_weights(variables['params'], weight_scales, spec)
    model_size_bytes(variables['params'], spec)

Quantization is simulated in float32 (fake quantization with a straight-through gradient), so
QAT, attacks and evaluation reuse the float code paths; `export` holds the real integer weights.
"""
from __future__ import annotations

from adcorda_jax.quant.calibration import (CALIBRATION_METHODS, calibrate_activations,
                                           calibrate_tensor, calibrate_weights)
from adcorda_jax.quant.export import (export_integer_weights, import_integer_weights,
                                      model_size_bytes)
from adcorda_jax.quant.fake_quant import (QuantSpec, ScaleZeroPoint, activation_spec_from_config,
                                          compute_scale, fake_quantize, quant_range,
                                          quant_spec_from_config, quantize_dequantize)
from adcorda_jax.quant.quantized_model import (fake_quantize_params, fold_batch_norm,
                                               quantized_apply_fn, quantized_logits_fn)

__all__ = ["CALIBRATION_METHODS", "QuantSpec", "ScaleZeroPoint", "activation_spec_from_config",
           "calibrate_activations", "calibrate_tensor", "calibrate_weights", "compute_scale",
           "export_integer_weights", "fake_quantize", "fake_quantize_params", "fold_batch_norm",
           "import_integer_weights", "model_size_bytes", "quant_range", "quant_spec_from_config",
           "quantize_dequantize", "quantized_apply_fn", "quantized_logits_fn"]
