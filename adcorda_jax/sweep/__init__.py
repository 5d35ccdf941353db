"""Sweeps over any config (task=sweep): axes of overrides, cells as ordinary runs, aggregation."""
from adcorda_jax.sweep import axes

__all__ = ["axes"]
