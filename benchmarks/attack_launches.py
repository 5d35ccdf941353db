"""Checks that an attack call is one device program with no host round trip inside it.

    python benchmarks/attack_launches.py [--batch 512] [--json out.json]

For PGD-10, APGD-CE and the correction attack on the small CNN (`attack_model`'s path on this
backend): (1) the traced call holds exactly one top-level jitted program (one launch per attack
call: the steps are a `lax.while_loop` inside it; any other top-level op, such as the step-size
rule's multiply, is listed), and (2) running it with device-resident inputs under
`jax.transfer_guard_device_to_host("disallow")` succeeds: nothing is copied back to the host (a
host synchronization) between its start and its result. Prints and writes one JSON record per
attack. (Scalar settings such as APGD's rho are uploaded with the launch; that is not a sync.)
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.models import create_model


def launches(fn, *args) -> tuple[int, list[str]]:
  """(jitted programs, other primitives) at the top level of `fn(*args)`: what a call launches.

  Every top-level jitted call is one program launch, and every other top-level primitive would
  be one more (an op dispatched outside the attack's program).
  """
  jaxpr = jax.make_jaxpr(fn)(*args)
  names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  programs = sum(1 for name in names if name in ("pjit", "jit"))
  return programs, [name for name in names if name not in ("pjit", "jit")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  model = create_model({"name": "small_cnn"}, 10, mean=(0.5,), std=(0.25,))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  logits_fn, params = attack_model(model, variables)
  rng = np.random.default_rng(0)
  x = jax.device_put(jnp.asarray(rng.uniform(size=(args.batch, 28, 28, 1)), jnp.float32))
  labels = jax.device_put(jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32))
  key = jax.device_put(jax.random.key(1))
  eps = jax.device_put(jnp.full((args.batch,), 8 / 255, jnp.float32))
  params = jax.device_put(params)

  records = []
  for name, steps in (("pgd", 10), ("apgd_ce", 100), ("correct", 10)):
    spec = AttackSpec(name=name, steps=steps, early_stop=False)
    def attack(p, xs, ys, k, e, spec=spec):  # The library's call, as a user makes it.
      return spec.run(logits_fn, p, xs, ys, k, e).adversarial
    programs, other = launches(attack, params, x, labels, key, eps)
    jax.block_until_ready(attack(params, x, labels, key, eps))  # Compile outside the guard.
    guard_ok, error = True, ""
    start = time.perf_counter()
    try:
      with jax.transfer_guard_device_to_host("disallow"):
        jax.block_until_ready(attack(params, x, labels, key, eps))
    except Exception as exc:  # pylint: disable=broad-except
      guard_ok, error = False, str(exc).splitlines()[0][:300]
    seconds = time.perf_counter() - start
    records.append({"attack": name, "steps": steps, "batch": args.batch,
                    "backend": jax.default_backend(), "programs_per_call": programs,
                    "ops_outside_programs": other, "no_host_sync": guard_ok, "error": error,
                    "seconds": seconds})
    print(json.dumps(records[-1]), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
  if not all(r["no_host_sync"] and r["programs_per_call"] == 1 for r in records):
    raise SystemExit("an attack call launched more than one program or synchronized with the host")


if __name__ == "__main__":
  main()
