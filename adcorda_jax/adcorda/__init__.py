"""AdCorDA (arXiv 2401.13212) building blocks: the corrected training set and alignment losses.

Stage 1 replaces the misclassified training inputs by their `correct`-attack outputs
(`build_corrected_set`); stage 2 fine-tunes on that set (source) against the original set
(target) with cross-entropy plus `lambda * alignment_loss(name)(source_features, target_features)`.
"""
from __future__ import annotations

from adcorda_jax.adcorda.alignment import (
    ALIGNMENT_LOSSES,
    alignment_loss,
    coral_loss,
    covariance,
    mmd_loss,
)
from adcorda_jax.adcorda.correction_set import (
    FAILURE_POLICIES,
    CorrectedSet,
    build_corrected_set,
    build_corrected_set_from_subset,
    correction_provenance,
    load_corrected_set,
    misclassified_indices,
    save_corrected_set,
)

__all__ = ["ALIGNMENT_LOSSES", "FAILURE_POLICIES", "CorrectedSet", "alignment_loss",
           "build_corrected_set", "build_corrected_set_from_subset", "coral_loss",
           "correction_provenance", "covariance", "load_corrected_set", "misclassified_indices",
           "mmd_loss", "save_corrected_set"]
