"""Square attack (Andriushchenko et al. 2020): random search that needs logits, never gradients.

Each query changes one random s x s window of the current best point and keeps the change when
the margin z_y - max_{i != y} z_i falls or the example becomes misclassified. Only forward passes
of `logits_fn` are used, so it also breaks models whose gradient is zero, undefined or misleading
(step functions, quantized activations, argmax outputs), which fools gradient attacks. The whole
run is one `lax.while_loop`, and an example stops taking queries once it is misclassified
(the batch still runs a forward pass per query until every example is done or the queries run
out). `queries`, `norm` and `restarts` are static; eps and p_init are traced, so the window side
is computed in the loop (in float32; equal to the reference's float64 sides for the image sizes
and p_init values tested).

As in AutoAttack's reference (`autoattack/square.py`, margin loss, p_init 0.8, rescaled schedule):
  * linf: start from vertical stripes x +- eps (one sign per column and channel); a query sets its
    window to x +- eps, one sign per channel;
  * l2: start from a grid of s0 x s0 tiles, s0 = min(h, w) // 5, each the "meta pseudo-gaussian"
    eta (two halves of concentric rectangles with opposite signs) times one sign per channel,
    scaled to norm eps; a query moves the mass of a second window into the first as eta plus the
    window's old content, and the result is rescaled to norm eps;
  * the window side is s = round(sqrt(p * h * w)) (linf: >= 1; l2: >= 3 and odd), capped at
    min(h, w), with p = p_init halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 of 10000, rescaled to `queries` (`p_schedule`).

Where we deviate (mostly to fit one compiled, per-example program):
  * `queries` counts forward passes including the initial one (the reference makes n_queries
    updates after it); `steps_used` is the pass at which an example was first misclassified
    (1 = the start), or `queries` if never;
  * window positions, signs and eta's orientation are drawn per example (the reference shares
    one window per query across the batch), each query from `fold_in(key, iteration)`; positions
    are uniform over all h - s + 1 offsets (the reference's `random_int` never picks the last);
  * the l2 start lays dim // s0 tiles centred on each axis (s0 >= 1): the reference's layout for
    28, 32 or 224 pixel squares, also defined for small or non-square images;
  * success is argmax != label as in every attack here (the reference counts a margin of exactly
    0, a tie, as success); every example is attacked, also those misclassified on x;
  * unbroken examples return their lowest-margin point (the reference returns x); restarts run
    from new random starts for the unbroken examples via `run_restarts`.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.attacks import compaction, norms, validation
from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks.losses import AttackResult, LogitsFn, is_success, pick_per_example
from adcorda_jax.attacks.pgd import as_budget, run_restarts
from adcorda_jax.attacks.registry import AttackMethod, describe_restarts, register
from adcorda_jax.errors import ConfigError

if TYPE_CHECKING:
  from adcorda_jax.attacks.specs import AttackSpec

# (last iteration out of 10000, divisor of p_init up to it); after 8000: p_init / 512.
_P_DIVISORS = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256))


def p_divisor(iteration: int, queries: int) -> int:
  """p_init / p at update `iteration` of `queries`: the reference's `p_selection`."""
  rescaled = int(iteration / queries * 10000)
  for last, divisor in _P_DIVISORS:
    if rescaled <= last:
      return divisor
  return 512


def p_schedule(iteration: int, queries: int, p_init: float) -> float:
  """The fraction of pixels the window of update `iteration` covers (host side)."""
  return p_init / p_divisor(iteration, queries)


def window_size(p: jax.Array | float, height: int, width: int, norm: str) -> jax.Array:
  """int32 side of the square for pixel fraction `p`: round(sqrt(p h w)), capped at min(h, w)."""
  side = jnp.round(jnp.sqrt(jnp.asarray(p, jnp.float32) * float(height * width))).astype(jnp.int32)
  if norm == "linf":
    side = jnp.maximum(side, 1)
  else:
    side = jnp.maximum(side, 3)
    side = side + (side % 2 == 0)
  return jnp.minimum(side, min(height, width))


def _rectangles(rows: jax.Array, cols: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
  """Unit-norm concentric rectangles on a rows x cols block, at its local coordinates (i, j).

  The ring at Chebyshev distance d from the centre (rows // 2, cols // 2) holds
  sum_{k=d}^{K-1} 1 / (k + 1)^2, K = max(rows, cols) // 2 + 1; zero outside the block.
  """
  k = jnp.arange(max(i.shape[0], j.shape[1]) + 2, dtype=jnp.float32)
  harmonic = jnp.concatenate([jnp.zeros(1), jnp.cumsum(1.0 / (k + 1.0) ** 2)])
  distance = jnp.maximum(jnp.abs(i - rows // 2), jnp.abs(j - cols // 2))
  rings = jnp.maximum(rows // 2, cols // 2) + 1
  inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
  value = jnp.where(inside, harmonic[rings] - harmonic[jnp.clip(distance, 0, rings)], 0.0)
  return value / jnp.maximum(jnp.sqrt(jnp.sum(value * value)), 1e-30)


@functools.partial(jax.jit, static_argnames="extent")
def eta(size: jax.Array | int, extent: int) -> jax.Array:
  """The reference's l2 pattern for a size x size window, zero-padded to [extent, extent].

  Rows [0, size // 2) hold positive rectangles, rows [size // 2, size) negative ones, each half
  of unit norm; the whole has unit norm. `size` may be traced (it changes with the iteration).
  """
  i = jnp.arange(extent)[:, None]
  j = jnp.arange(extent)[None, :]
  top = size // 2
  pattern = _rectangles(top, size, i, j) - _rectangles(size - top, size, i - top, j)
  return pattern / jnp.sqrt(jnp.sum(pattern * pattern))


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[N] float32 z_y - max_{i != y} z_i: negative when the example is misclassified."""
  logits = logits.astype(jnp.float32)
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jnp.arange(logits.shape[-1]) == labels[:, None], -jnp.inf, logits)
  return true - jnp.max(others, axis=-1)


def _offset(uniform: jax.Array, extent: int, size: jax.Array) -> jax.Array:
  """[N] int32 window offsets, uniform over the extent - size + 1 positions, from [N] uniforms."""
  positions = extent - size + 1
  return jnp.minimum(jnp.floor(uniform * positions).astype(jnp.int32), positions - 1)


def _sign(uniform: jax.Array) -> jax.Array:
  """Random signs +-1 from uniforms in [0, 1)."""
  return jnp.where(uniform < 0.5, -1.0, 1.0)


def _window(top: jax.Array, left: jax.Array, size: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[N, H, W, 1] bool: the per-example window [top, top + size) x [left, left + size)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (1, shape[1], 1, 1), 1)
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, 1, shape[2], 1), 2)
  top, left = top[:, None, None, None], left[:, None, None, None]
  return (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)


def _place(pattern: jax.Array, top: jax.Array, left: jax.Array, flip: jax.Array,
           shape: tuple[int, ...]) -> jax.Array:
  """[N, H, W, 1]: the [M, M] `pattern` at each example's (top, left), transposed where `flip`."""
  last = pattern.shape[0] - 1
  rows = jnp.arange(shape[1])[None, :, None] - top[:, None, None]
  cols = jnp.arange(shape[2])[None, None, :] - left[:, None, None]
  inside = (rows >= 0) & (rows <= last) & (cols >= 0) & (cols <= last)
  rows, cols = jnp.clip(rows, 0, last), jnp.clip(cols, 0, last)
  flip = flip[:, None, None]
  placed = pattern[jnp.where(flip, cols, rows), jnp.where(flip, rows, cols)]
  return jnp.where(inside, placed, 0.0)[..., None]


def _l2_start(key: jax.Array, x: jax.Array, eps: jax.Array) -> jax.Array:
  """The reference's l2 start: a centred grid of eta tiles with random signs, at norm eps."""
  n, height, width, channels = x.shape
  size = max(min(height, width) // 5, 1)
  counts = (height // size, width // size)
  offsets = ((height - counts[0] * size) // 2, (width - counts[1] * size) // 2)
  tile_rows = (np.arange(height) - offsets[0]) // size
  tile_cols = (np.arange(width) - offsets[1]) // size
  inside = ((tile_rows >= 0) & (tile_rows < counts[0]))[:, None] & (
      (tile_cols >= 0) & (tile_cols < counts[1]))[None, :]
  tile = np.where(inside, np.clip(tile_rows, 0, None)[:, None] * counts[1]
                  + np.clip(tile_cols, 0, None)[None, :], 0)
  local_rows = ((np.arange(height) - offsets[0]) % size)[:, None]
  local_cols = ((np.arange(width) - offsets[1]) % size)[None, :]
  base = eta(size, size)
  draws = jax.random.uniform(key, (n, counts[0] * counts[1], 1 + channels))
  signs, flips = _sign(draws[..., 1:]), draws[..., 0] < 0.5
  values = jnp.where(flips[:, tile], base[local_cols, local_rows], base[local_rows, local_cols])
  delta = jnp.where(inside[None, :, :, None], values[..., None] * signs[:, tile], 0.0)
  unit = delta / norms.per_example(norms.perturbation_norm(delta, "l2") + 1e-12, x)
  return jnp.clip(x + unit * norms.per_example(eps, x), 0.0, 1.0)


def _l2_candidate(key: jax.Array, x: jax.Array, best: jax.Array, eps: jax.Array,
                  size: jax.Array) -> jax.Array:
  """The reference's l2 query: window 1 becomes eta + its old (unit) content, window 2 is
  emptied, the windows' mass plus the unused budget is kept, and the total is rescaled to eps."""
  n, height, width, channels = x.shape
  draws = jax.random.uniform(key, (n, 5 + channels))
  offsets = [_offset(draws[:, k], limit, size)
             for k, limit in enumerate((height, width, height, width))]
  flips = draws[:, 4] < 0.5
  signs = _sign(draws[:, None, None, 5:])
  first = _window(offsets[0], offsets[1], size, x.shape)
  second = _window(offsets[2], offsets[3], size, x.shape)

  def channel_norm(values):  # l2 norm over the image plane, per example and channel.
    return jnp.sqrt(jnp.sum(values * values, axis=(1, 2), keepdims=True))

  delta = best - x
  spent = norms.per_example(norms.perturbation_norm(delta, "l2"), x)
  old = jnp.where(first, delta, 0.0)
  pattern = _place(eta(size, min(height, width)), offsets[0], offsets[1], flips, x.shape)
  new = pattern * signs + old / (channel_norm(old) + 1e-12)
  eps4 = norms.per_example(eps, x)
  mass = jnp.maximum(eps4 ** 2 - spent ** 2, 0.0) / channels + channel_norm(
      jnp.where(first | second, delta, 0.0)) ** 2
  new = new / (channel_norm(new) + 1e-12) * jnp.sqrt(mass)
  delta = jnp.where(first, new, jnp.where(second, 0.0, delta))
  unit = delta / norms.per_example(norms.perturbation_norm(delta, "l2") + 1e-12, x)
  return jnp.clip(x + unit * eps4, 0.0, 1.0)


def _linf_candidate(key: jax.Array, x: jax.Array, best: jax.Array, eps: jax.Array,
                    size: jax.Array) -> jax.Array:
  """The reference's linf query: one window set to x +- eps, one random sign per channel."""
  n, height, width, channels = x.shape
  draws = jax.random.uniform(key, (n, 2 + channels))
  top, left = _offset(draws[:, 0], height, size), _offset(draws[:, 1], width, size)
  signs = _sign(draws[:, None, None, 2:])
  corner = jnp.clip(x + norms.per_example(eps, x) * signs, 0.0, 1.0)
  return jnp.where(_window(top, left, size, x.shape), corner, best)


def square_run(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
               key: jax.Array, start: jax.Array, frozen: jax.Array, eps: jax.Array,
               p_init: jax.Array, *, queries: int, norm: str) -> tuple[jax.Array, jax.Array]:
  """One Square run: (adversarial, forward passes until first success or `queries`).

  Non-frozen examples start from the reference's random start; `frozen` ones keep `start` and
  report 0 passes. Every candidate is projected on the ball and box before it is evaluated.
  """
  n, height, width, channels = x.shape
  start_key, loop_key = jax.random.split(key)
  if norm == "linf":  # Vertical stripes: one sign per column and channel.
    stripes = _sign(jax.random.uniform(start_key, (n, 1, width, channels)))
    init = x + norms.per_example(eps, x) * stripes
  else:
    init = _l2_start(start_key, x, eps)
  best = pick_per_example(frozen, start, norms.project(init, x, eps, norm))
  logits = logits_fn(params, best)
  done = frozen | is_success(logits, labels, False)
  first_success = jnp.where(frozen, 0, 1).astype(jnp.int32)
  # p_init / p for each update; queries - 1 updates follow the initial pass.
  divisors = jnp.asarray(np.array([p_divisor(i, queries) for i in range(max(queries - 1, 1))],
                                  np.float32))
  candidate_fn = _linf_candidate if norm == "linf" else _l2_candidate

  def cond(state):
    iteration, _, _, done, _ = state
    return (iteration < queries - 1) & jnp.any(~done)

  def body(state):
    iteration, best, best_margin, done, first_success = state
    size = window_size(p_init / divisors[iteration], height, width, norm)
    candidate = candidate_fn(jax.random.fold_in(loop_key, iteration), x, best, eps, size)
    candidate = norms.project(candidate, x, eps, norm)
    # Only the examples still unbroken are evaluated (bucketed); the others are ignored below.
    logits = compaction.on_active(lambda batch: logits_fn(params, batch), ~done, candidate)
    success = is_success(logits, labels, False)
    candidate_margin = margin(logits, labels)
    accept = ~done & ((candidate_margin < best_margin) | success)
    best, best_margin = pick_per_example(accept, (candidate, candidate_margin),
                                         (best, best_margin))
    newly = accept & success
    first_success = jnp.where(newly, iteration + 2, first_success)
    return iteration + 1, best, best_margin, done | newly, first_success

  state = (jnp.int32(0), best, margin(logits, labels), done, first_success)
  _, best, _, done, first_success = jax.lax.while_loop(cond, body, state)
  return best, jnp.where(done, first_success, queries)


@attack_jit(static_argnames=("logits_fn", "queries", "norm", "restarts"))
def _square(logits_fn, params, x, labels, key, eps, p_init, *, queries, norm, restarts):
  x32 = x.astype(jnp.float32)

  def run_once(index, run_key, adversarial, frozen):
    del index  # Every restart is the same attack from a new start.
    return square_run(logits_fn, params, x32, labels, run_key, adversarial, frozen, eps, p_init,
                      queries=queries, norm=norm)

  result = run_restarts(run_once, logits_fn, params, x32, labels, key, restarts=restarts,
                        steps=queries, norm=norm, targeted=False)
  return result.replace(adversarial=result.adversarial.astype(x.dtype))


def square(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
           key: jax.Array, eps: float | jax.Array, queries: int = 5000, norm: str = "linf",
           p_init: float = 0.8, restarts: int = 1) -> AttackResult:
  """Untargeted Square attack in the `norm` ball of radius `eps` (scalar or per example [N]).

  Spends at most `queries` forward passes per example and restart (none on gradients); windows
  start at a fraction `p_init` of the pixels and shrink on the reference's schedule. Images are
  float NHWC in [0, 1] of any height, width and channel count. `steps_used` counts queries.
  """
  if len(np.shape(x)) != 4:
    raise ConfigError(f"x must be NHWC images [N, H, W, C], got shape {np.shape(x)}")
  validation.check_attack_inputs(logits_fn, params, x, labels, eps=eps, norm=norm)
  validation.check_positive_int(queries, "queries")
  validation.check_positive_int(restarts, "restarts")
  validation.check_unit_interval(p_init, "p_init")
  validation.check_key(key, required=True, reason=" (square draws its windows at random)")
  return _square(logits_fn, params, jnp.asarray(x), jnp.asarray(labels, jnp.int32), key,
                 as_budget(eps, np.shape(x)[0]), jnp.asarray(p_init, jnp.float32),
                 queries=int(queries), norm=norm, restarts=int(restarts))


# The registry entry (see `adcorda_jax.attacks.registry`); `AttackSpec.steps` holds the queries.


def _read_square(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  return {"steps": config_checks.positive_int(section, "queries", prefix, default=5000),
          "p_init": config_checks.unit_fraction(section, "p_init", prefix, default=0.8),
          "restarts": config_checks.positive_int(section, "restarts", prefix, default=1)}


def _run_square(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
                labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  return _square(logits_fn, params, x, labels, key, eps, jnp.float32(spec.p_init),
                 queries=spec.steps, norm=spec.norm, restarts=spec.restarts)


def _describe_square(spec: AttackSpec) -> str:
  return (f"square {spec.norm}, {spec.steps} queries, p_init {spec.p_init:g}"
          + describe_restarts(spec))


register(AttackMethod(name="square", section="square", read=_read_square, run=_run_square,
                      describe=_describe_square))
