"""The compression methods of the study, chosen by name (`study.methods`).

Each module defines one `CompressionMethod` and registers it; the registration order below is the
default `study.methods` order (the paper's). To add a method, write one module like
`filter_pruning.py` and import it here.
"""
from __future__ import annotations

from adcorda_jax.study.methods.base import (COMPRESSION_METHODS, Compressed, CompressionMethod,
                                            Original, check_fraction, read_method_settings,
                                            register_method)

# Importing a method's module registers it, in this order.
from adcorda_jax.study.methods import filter_pruning  # noqa: F401
from adcorda_jax.study.methods import magnitude_pruning  # noqa: F401
from adcorda_jax.study.methods import distillation  # noqa: F401
from adcorda_jax.study.methods import ptq  # noqa: F401

__all__ = ["COMPRESSION_METHODS", "Compressed", "CompressionMethod", "Original", "check_fraction",
           "read_method_settings", "register_method"]
