"""Compression: pruning to physically narrower networks or sparse weights, and what they cost.

Knowledge distillation lives in `compression.distillation`.

    new_config, new_variables = l1_filter_prune(config.model.to_dict(), variables, ratio=0.3)
    masks = magnitude_masks(params, 0.5, scope='global'); params = apply_masks(params, masks)
    tx = masked_optimizer(base_tx, masks)                         # fine-tuning keeps zeros at 0
    tx = pruning_optimizer(base_tx, final_sparsity=0.8, end_step=1000, update_every=100)
    sparsity_report(params)['total'], flops_per_example(model, variables, (32, 32, 3))
"""
from __future__ import annotations

from adcorda_jax.compression.filter_pruning import filters_to_keep, l1_filter_prune
from adcorda_jax.compression.magnitude_pruning import (SCOPES, PruningState, apply_masks,
                                                       magnitude_masks, masked_optimizer,
                                                       polynomial_sparsity, pruning_masks,
                                                       pruning_optimizer, sparsity_report)
from adcorda_jax.compression.model_stats import (count_parameters, flops_per_example,
                                                 nonzero_parameters, size_bytes)

__all__ = ["SCOPES", "PruningState", "apply_masks", "count_parameters", "filters_to_keep",
           "flops_per_example", "l1_filter_prune", "magnitude_masks", "masked_optimizer",
           "nonzero_parameters", "polynomial_sparsity", "pruning_masks", "pruning_optimizer",
           "size_bytes", "sparsity_report"]
