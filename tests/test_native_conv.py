"""The native CPU convolution: values equal XLA's, transforms and sharding work, fallbacks hold."""
from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

from adcorda_jax.models import fast_conv
from adcorda_jax.native import build
from adcorda_jax.native import conv2d as native_conv
from adcorda_jax.native import tune

REPO = Path(__file__).resolve().parents[1]
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

needs_native = pytest.mark.skipif(not native_conv.available(),
                                  reason="no C++ compiler: the native kernel is not built")


def _reference(x, kernel, strides, padding):
  """Explicit crop/zero-pad, then a VALID XLA convolution at full precision."""
  for axis, (lo, hi) in zip((1, 2), padding):
    x = lax.slice_in_dim(x, max(-lo, 0), x.shape[axis] + min(hi, 0), axis=axis)
    widths = [(0, 0)] * 4
    widths[axis] = (max(lo, 0), max(hi, 0))
    x = jnp.pad(x, widths)
  return lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=DIMENSION_NUMBERS,
                                  precision=lax.Precision.HIGHEST)


def test_kernel_is_built_wherever_a_compiler_exists():
  # CI installs a compiler, so there this guards against silently testing only the fallback.
  if build._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  kernel = build.conv2d_kernel()
  assert kernel is not None and kernel.lanes in (4, 8, 16)
  assert kernel.path.exists() and kernel.path.parent == build._cache_dir()


@pytest.mark.slow
@needs_native
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), height=st.integers(1, 11), width=st.integers(1, 30),
       channels=st.integers(1, 20), out_channels=st.integers(1, 40), kh=st.integers(1, 5),
       kw=st.integers(1, 4), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pads=st.tuples(*[st.integers(0, 3)] * 4), seed=st.integers(0, 2**16))
def test_native_conv_equals_xla(batch, height, width, channels, out_channels, kh, kw, stride,
                                pads, seed):
  padding = ((pads[0], pads[1]), (pads[2], pads[3]))
  assume(height + pads[0] + pads[1] >= kh and width + pads[2] + pads[3] >= kw)  # Kernel fits.
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (batch, height, width, channels))
  kernel = jax.random.normal(keys[1], (kh, kw, channels, out_channels))
  got = jax.jit(native_conv.conv2d, static_argnums=(2, 3))(x, kernel, stride, padding)
  expected = _reference(x, kernel, stride, padding)
  chex.assert_equal_shape((got, expected))
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("height,channels,out_channels,kernel_size,stride", [
    (32, 3, 16, 3, 1),   # ResNet-20 stem
    (32, 16, 16, 3, 1),  # stage 1: 1 vector of outputs, widest pixel blocks
    (16, 32, 32, 3, 1),  # stage 2: 2 vectors
    (8, 64, 64, 3, 1),   # stage 3: 2 blocks of 2 vectors
    (32, 16, 32, 3, 2),  # strided stage entry
    (17, 16, 64, 2, 1),  # the stacked-phase input gradient of a stride-2 3x3 layer
    (28, 1, 32, 3, 1),   # small CNN input layer
])
def test_model_layer_shapes_equal_xla(height, channels, out_channels, kernel_size, stride):
  keys = jax.random.split(jax.random.key(height + channels), 2)
  x = jax.random.normal(keys[0], (2, height, height, channels))
  kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, channels, out_channels))
  padding = ((1, 1), (1, 1)) if kernel_size == 3 else ((1, 0), (1, 0))
  got = native_conv.conv2d(x, kernel, (stride, stride), padding)
  np.testing.assert_allclose(got, _reference(x, kernel, (stride, stride), padding), atol=2e-4,
                             rtol=2e-4)


@pytest.mark.slow
@needs_native
def test_negative_padding_crops_on_both_paths():
  # Input gradients of layers padded beyond kernel-1 need negative padding; XLA:CPU gets those
  # wrong for several input channels, so fast_conv crops explicitly on both paths.
  keys = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(keys[0], (2, 7, 9, 5))
  kernel = jax.random.normal(keys[1], (2, 3, 5, 16))
  padding = ((-1, 2), (-2, 1))
  expected = _reference(x, kernel, (1, 1), padding)
  for native in (True, False):
    got = fast_conv._conv(x, kernel, (1, 1), padding, native)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=f"native={native}")


@pytest.mark.slow
@needs_native
def test_vmap_folds_inputs_and_falls_back_for_batched_kernels():
  keys = jax.random.split(jax.random.key(1), 3)
  xs = jax.random.normal(keys[0], (3, 2, 6, 6, 4))
  kernel = jax.random.normal(keys[1], (3, 3, 4, 16))
  kernels = jax.random.normal(keys[2], (3, 3, 3, 4, 16))
  args = ((1, 1), ((1, 1), (1, 1)))
  conv = lambda x, k: native_conv.conv2d(x, k, *args)
  folded = jax.jit(jax.vmap(conv, in_axes=(0, None)))(xs, kernel)
  per_kernel = jax.jit(jax.vmap(conv))(xs, kernels)
  for i in range(3):
    np.testing.assert_allclose(folded[i], _reference(xs[i], kernel, *args), atol=1e-4)
    np.testing.assert_allclose(per_kernel[i], _reference(xs[i], kernels[i], *args), atol=1e-4)
  # Folding is one native call over all 6 images, not a loop of 3.
  text = jax.jit(jax.vmap(conv, in_axes=(0, None))).lower(xs, kernel).as_text()
  assert text.count(build.TARGET) == 1 and "while" not in text


@pytest.mark.slow
@needs_native
def test_gradients_through_the_native_path_equal_autodiff():
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (2, 9, 9, 3))
  kernel = jax.random.normal(keys[1], (3, 3, 3, 16))
  weights = jax.random.normal(keys[2], (2, 5, 5, 16))
  args = ((2, 2), ((1, 1), (1, 1)))
  loss = lambda conv, v: jnp.sum(jnp.tanh(conv(v)) * weights)
  fast = jax.grad(lambda v: loss(lambda u: fast_conv.conv2d(u, kernel, *args, True), v))(x)
  plain = jax.grad(lambda v: loss(lambda u: _reference(u, kernel, *args), v))(x)
  np.testing.assert_allclose(fast, plain, atol=1e-4, rtol=1e-4)
  lowered = jax.jit(jax.grad(lambda v: loss(lambda u: fast_conv.conv2d(u, kernel, *args), v)))
  assert lowered.lower(x).as_text().count(build.TARGET) == 2  # forward + input gradient


_FOUR_DEVICES = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adcorda_jax.native import build, conv2d as native_conv
assert jax.device_count() == 4 and native_conv.available()
x = jax.random.normal(jax.random.key(0), (8, 10, 10, 16))
k = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
ks = jax.device_put(k, NamedSharding(mesh, P()))
f = jax.jit(lambda x, k: jnp.tanh(native_conv.conv2d(x, k, (1, 1), ((1, 1), (1, 1)))))
hlo = f.lower(xs, ks).compile().as_text()
assert "all-gather" not in hlo and "all-reduce" not in hlo, "conv input was gathered"
y = f(xs, ks)
assert y.sharding.spec[0] == "data", y.sharding
np.save(sys.argv[1], np.asarray(y))
"""


@pytest.mark.slow
@pytest.mark.subprocess
@needs_native
def test_sharded_batch_is_convolved_per_device(tmp_path):
  x = jax.random.normal(jax.random.key(0), (8, 10, 10, 16))
  k = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
  single = jnp.tanh(native_conv.conv2d(x, k, (1, 1), ((1, 1), (1, 1))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path / "y.npy")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), single, atol=1e-5)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
  """An empty kernel cache and a forgotten kernel, restored afterwards. The default variant is
  forced (no tuning) unless a test removes $ADCORDA_NATIVE_VARIANT."""
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(tune.VARIANT_ENV, tune.candidates(build._cpu_flags())[0].name)
  build.conv2d_kernel.cache_clear()
  yield tmp_path / "cache"
  build.conv2d_kernel.cache_clear()


def test_disabled_by_environment(fresh_build, monkeypatch):
  monkeypatch.setenv(build.DISABLE_ENV, "0")
  assert build.conv2d_kernel() is None and not native_conv.available()
  assert not fresh_build.exists()


@pytest.mark.slow
def test_failing_compiler_falls_back_to_xla(fresh_build, monkeypatch, caplog):
  monkeypatch.setenv(build.COMPILER_ENV, "false")  # A "compiler" that always fails.
  with caplog.at_level(std_logging.WARNING):
    assert build.conv2d_kernel() is None
  assert "Native CPU convolution unavailable" in caplog.text
  assert not list(fresh_build.glob("*")), "a failed build left files behind"
  # The fast path still works, on XLA's convolutions.
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 8))
  np.testing.assert_allclose(fast_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1))),
                             _reference(x, kernel, (1, 1), ((1, 1), (1, 1))), atol=1e-4)


@pytest.mark.slow
def test_cached_library_is_reused_not_rebuilt(fresh_build, monkeypatch):
  if build._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  first = build.conv2d_kernel()
  assert first is not None and list(fresh_build.glob("*")) == [first.path]
  mtime = first.path.stat().st_mtime_ns
  build.conv2d_kernel.cache_clear()
  calls = []
  monkeypatch.setattr(build, "compile_library", lambda *a: calls.append(a))
  assert build.conv2d_kernel().path == first.path and not calls
  assert first.path.stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 instruction sets")
@pytest.mark.parametrize("march,lanes", [("x86-64-v3", 8), ("x86-64", 4)])
def test_avx2_and_portable_builds_equal_xla(fresh_build, monkeypatch, march, lanes):
  # Laptops without AVX-512 get the AVX2 path, other CPUs the portable one: check both here.
  if build._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  monkeypatch.setenv(build.MARCH_ENV, march)
  monkeypatch.delenv(tune.VARIANT_ENV)  # Another CPU's build: the source's defaults, no tuning.
  kernel = build.conv2d_kernel()
  assert kernel is not None and kernel.lanes == lanes and kernel.variant == "default"
  keys = jax.random.split(jax.random.key(4), 2)
  x = jax.random.normal(keys[0], (3, 9, 21, 5))  # Wide enough for every pixel-block size.
  for kw, strides, padding in [(3, (1, 1), ((1, 1), (1, 1))), (2, (1, 1), ((1, 1), (0, 1))),
                               (2, (2, 1), ((0, 2), (1, 0))), (3, (1, 2), ((0, 0), (2, 1)))]:
    weights = jax.random.normal(keys[1], (3, kw, 5, 3 * lanes))
    got = native_conv._ffi_conv(x, weights, strides, padding)
    np.testing.assert_allclose(got, _reference(x, weights, strides, padding), atol=1e-4,
                               rtol=1e-4, err_msg=f"{march} {kw} {strides} {padding}")


def test_candidates_fit_each_instruction_set():
  avx512 = tune.candidates("fpu sse2 avx2 fma avx512f avx512vl")
  assert {v.vector_bits for v in avx512} == {512, 256} and all(v.registers == 32 for v in avx512)
  avx2 = tune.candidates("fpu sse2 avx2 fma")
  # 16 registers: two vectors of output channels x tap pixels + 6 kernel vectors + 1 broadcast.
  assert all(v.vector_bits == 256 and 2 * v.tap_pixels2 + 7 <= 16 for v in avx2)
  assert len(tune.candidates("fp asimd")) == 1  # Portable code: nothing to choose.
  for variant in avx512 + avx2:
    assert tune.variant_named(variant.name, "avx2 fma avx512f").name == variant.name


def test_malformed_variant_name_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"ADCORDA_NATIVE_VARIANT='fast'.*zmm-t"):
    tune.variant_named("fast", "avx512f")


def test_each_block_size_comes_from_the_shapes_it_decides():
  variants = tune.candidates("avx2 fma avx512f")
  seconds = {v.name: [1.0] * len(tune.SHAPES) for v in variants}
  one_vector = tune.DECIDES.index("tap_pixels1")
  strided = tune.DECIDES.index("pixels")
  seconds[variants[2].name][one_vector] = 0.1   # fastest 16-channel layers
  seconds[variants[1].name][strided] = 0.5      # fastest strided layers
  seconds[variants[3].name] = [9.0] * len(tune.SHAPES)  # the 256-bit build loses overall
  chosen = tune.compose(seconds, variants)
  assert chosen.vector_bits == 512
  assert chosen.tap_pixels1 == variants[2].tap_pixels1
  assert chosen.pixels == variants[1].pixels
  assert chosen.tap_pixels2 == variants[0].tap_pixels2  # ties keep the first (the default)


@pytest.mark.slow
@needs_native
def test_forced_variant_builds_and_computes_with_its_own_blocking(fresh_build, monkeypatch):
  variant = dataclasses.replace(tune.candidates(build._cpu_flags())[0], tap_pixels1=5,
                                tap_pixels2=3, pixels=2)
  monkeypatch.setenv(tune.VARIANT_ENV, variant.name)
  kernel = build.conv2d_kernel()
  assert kernel.variant == variant.name
  assert kernel.path == build.library_path(build._compiler(), variant)
  assert kernel.library.adcorda_conv2d_cpu_tap_pixels(1) == 5
  assert kernel.library.adcorda_conv2d_cpu_tap_pixels(2) == 3
  keys = jax.random.split(jax.random.key(7), 2)
  x = jax.random.normal(keys[0], (2, 7, 13, 6))
  for strides in ((1, 1), (2, 2)):
    weights = jax.random.normal(keys[1], (3, 3, 6, 2 * kernel.lanes))
    got = native_conv._ffi_conv(x, weights, strides, ((1, 1), (1, 1)))
    np.testing.assert_allclose(got, _reference(x, weights, strides, ((1, 1), (1, 1))),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_native
def test_tuning_measures_once_and_caches_its_choice(fresh_build, monkeypatch):
  monkeypatch.delenv(tune.VARIANT_ENV)
  default = tune.candidates(build._cpu_flags())[0]
  other = dataclasses.replace(default, tap_pixels1=6, tap_pixels2=4, pixels=4)
  monkeypatch.setattr(tune, "candidates", lambda flags: (default, other))
  kernel = build.conv2d_kernel()
  records = list(fresh_build.glob("conv2d_cpu-tuning-*.json"))
  assert len(records) == 1
  record = json.loads(records[0].read_text())
  assert set(record["seconds"]) == {default.name, other.name}
  assert all(len(times) == len(tune.SHAPES) and min(times) > 0
             for times in record["seconds"].values())
  assert kernel.variant == record["variant"]
  # Another process (here: a forgotten kernel) reads the choice instead of measuring again.
  build.conv2d_kernel.cache_clear()
  monkeypatch.setattr(tune, "measure", lambda libraries: pytest.fail("measured again"))
  assert build.conv2d_kernel().variant == record["variant"]
