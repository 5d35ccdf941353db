"""adcorda-jax: refine, compress and stress-test image classifiers in JAX."""

__version__ = "0.2.0"
