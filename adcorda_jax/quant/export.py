"""Real integer weights: export, import and the true storage size of a quantized model.

`export_integer_weights` stores every kernel as integer codes: one byte per weight (int8 for
symmetric signed codes, uint8 for asymmetric unsigned ones) at 5..8 bits, and a little-endian
bit stream of the unsigned codes (q - qmin) at 2..4 bits, i.e. ceil(n * bits / 8) bytes (two
4-bit or four 2-bit codes per byte). Scales (and, for asymmetric specs, zero points; symmetric
ones are 0 by construction) are float32; every other leaf stays float32.

`import_integer_weights` dequantizes back to float params equal, bit for bit, to
`fake_quantize_params` with the same scales, so accuracy measured with fake quantization is the
accuracy of the exported model. `model_size_bytes` counts exactly what the export stores.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.quant.fake_quant import (QuantSpec, ScaleZeroPoint, compute_scale, dequantize,
                                          is_kernel, path_string, quant_range, quantize)
from adcorda_jax.workdir import write_atomic

FLOAT_BYTES = 4
# Up to this many bits the codes are bit-packed; above it they take one byte each.
MAX_PACKED_BITS = 4


def _check_exportable(spec: QuantSpec) -> None:
  if spec.bits > 8:
    raise ValueError(f"integer export supports 2..8-bit weights, got {spec.bits} bits")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2^bits as a little-endian bit stream: ceil(n * bits / 8) uint8 bytes."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [n, bits], LSB first.
  return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
  """Inverse of `pack_bits`: the first `size` codes as int32."""
  planes = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
  planes = planes[:size * bits].reshape(size, bits).astype(np.int32)
  return (planes << np.arange(bits, dtype=np.int32)).sum(axis=-1)


def _kernel_bytes(size: int, bits: int) -> int:
  return math.ceil(size * bits / 8) if bits <= MAX_PACKED_BITS else size


def _export_kernel(kernel: jax.Array, grid: ScaleZeroPoint, spec: QuantSpec) -> dict[str, Any]:
  qmin, qmax = quant_range(spec.bits, spec.symmetric)
  scale, zero_point = grid
  codes = np.asarray(quantize(jnp.asarray(kernel, jnp.float32), scale, zero_point, qmin, qmax))
  if spec.bits <= MAX_PACKED_BITS:
    values = pack_bits(codes - qmin, spec.bits)
  else:
    values = codes.astype(np.int8 if spec.symmetric else np.uint8)
  entry = {"values": values, "shape": tuple(np.shape(kernel)),
           "scale": np.asarray(scale, np.float32)}
  if not spec.symmetric:
    entry["zero_point"] = np.asarray(zero_point, np.float32)
  return entry


def export_integer_weights(params: Any, weight_scales: Mapping[str, ScaleZeroPoint] | None,
                           spec: QuantSpec) -> dict[str, Any]:
  """{'bits', 'per_channel', 'symmetric', 'kernels': {path: entry}, 'floats': {path: array}}.

  A kernel entry holds `values` (int8/uint8 codes or packed uint8 bytes), `shape`, `scale` and,
  when asymmetric, `zero_point`. `weight_scales` None uses min-max scales of the kernels, as
  `fake_quantize_params` does.
  """
  _check_exportable(spec)
  kernels, floats = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = path_string(path)
    if is_kernel(path, leaf):
      grid = compute_scale(leaf, spec) if weight_scales is None else weight_scales[key]
      kernels[key] = _export_kernel(leaf, grid, spec)
    else:
      floats[key] = np.asarray(leaf, np.float32)
  return {"bits": spec.bits, "per_channel": spec.per_channel, "symmetric": spec.symmetric,
          "kernels": kernels, "floats": floats}


def _import_kernel(entry: Mapping[str, Any], spec: QuantSpec) -> jax.Array:
  qmin, _ = quant_range(spec.bits, spec.symmetric)
  shape = tuple(entry["shape"])
  if spec.bits <= MAX_PACKED_BITS:
    codes = unpack_bits(entry["values"], spec.bits, math.prod(shape)) + qmin
  else:
    codes = np.asarray(entry["values"], np.int32)
  scale = jnp.asarray(entry["scale"], jnp.float32)
  zero_point = jnp.asarray(entry.get("zero_point", np.zeros_like(entry["scale"])), jnp.float32)
  return dequantize(jnp.asarray(codes.reshape(shape), jnp.float32), scale, zero_point)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': v} -> {'a': {'b': {'c': v}}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, name = path.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return tree


def import_integer_weights(exported: Mapping[str, Any]) -> dict[str, Any]:
  """Float params (nested dicts) from `export_integer_weights`: kernels dequantized."""
  spec = QuantSpec(exported["bits"], exported["per_channel"], exported["symmetric"])
  flat = {path: jnp.asarray(value) for path, value in exported["floats"].items()}
  flat.update({path: _import_kernel(entry, spec) for path, entry in exported["kernels"].items()})
  return _nest(flat)


def model_size_bytes(params: Any, spec: QuantSpec | None = None) -> int:
  """Storage bytes of `params`: float32 everything when `spec` is None, else what the export keeps.

  Quantized kernels take ceil(n * bits / 8) bytes at <= 4 bits and n bytes at 5..8 bits, plus one
  float32 scale per tensor (or output channel) and, when asymmetric, one float32 zero point each.
  Works on arrays and on `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
  """
  if spec is not None:
    _check_exportable(spec)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = np.shape(leaf)
    size = math.prod(shape)
    if spec is None or not is_kernel(path, leaf):
      total += FLOAT_BYTES * size
      continue
    grids = shape[-1] if spec.per_channel else 1
    total += _kernel_bytes(size, spec.bits) + FLOAT_BYTES * grids * (1 if spec.symmetric else 2)
  return total


_META_KEY = "__meta__"


def save_exported(path: str | os.PathLike, exported: Mapping[str, Any],
                  batch_stats: Any = None) -> None:
  """Writes an `export_integer_weights` dict to one .npz file, atomically.

  Arrays keep their integer dtypes (`kernels/<path>/values`, `.../scale`, `.../zero_point`,
  `floats/<path>`); bit width, grid kind and kernel shapes go in a JSON `__meta__` entry.
  `batch_stats` (BatchNorm running statistics, float32) make the file a complete inference model.
  """
  arrays: dict[str, np.ndarray] = {}
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(batch_stats or {})[0]:
    arrays[f"batch_stats/{path_string(leaf_path)}"] = np.asarray(leaf, np.float32)
  shapes = {}
  for key, entry in exported["kernels"].items():
    shapes[key] = list(entry["shape"])
    for field in ("values", "scale", "zero_point"):
      if field in entry:
        arrays[f"kernels/{key}/{field}"] = np.asarray(entry[field])
  for key, value in exported["floats"].items():
    arrays[f"floats/{key}"] = np.asarray(value)
  meta = {"bits": exported["bits"], "per_channel": exported["per_channel"],
          "symmetric": exported["symmetric"], "shapes": shapes}
  arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  write_atomic(path, lambda f: np.savez(f, **arrays), mode="wb")


def load_exported(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a `save_exported` file back into the dict `import_integer_weights` takes.

  BatchNorm statistics saved with it come back nested under `batch_stats`.
  """
  with np.load(path) as data:
    meta = json.loads(data[_META_KEY].tobytes().decode())
    kernels: dict[str, dict[str, Any]] = {
        key: {"shape": tuple(shape)} for key, shape in meta["shapes"].items()}
    floats, stats = {}, {}
    for name in data.files:
      if name.startswith("batch_stats/"):
        stats[name[len("batch_stats/"):]] = data[name]
      if name.startswith("kernels/"):
        key, field = name[len("kernels/"):].rsplit("/", 1)
        kernels[key][field] = data[name]
      elif name.startswith("floats/"):
        floats[name[len("floats/"):]] = data[name]
  return {"bits": meta["bits"], "per_channel": meta["per_channel"],
          "symmetric": meta["symmetric"], "kernels": kernels, "floats": floats,
          "batch_stats": _nest(stats)}
