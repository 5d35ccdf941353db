"""Every program the library runs lowers for GPU and TPU, with the path it picks there.

`jax.export` lowers for other platforms on a CPU-only machine. Each program is built the way the
library builds it for `backend=` 'cuda' / 'tpu' (train, fine-tuning, QAT and distillation steps,
evaluation, the predictor, every registered attack, the corruptions) and lowered for that platform;
the lowered module must contain no CPU-only custom call (the native convolution kernels) and no
host callback. The control case: built for the CPU, the same programs do contain the native
kernels, so the check can fail.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from adcorda_jax.adcorda.alignment import alignment_loss
from adcorda_jax.attacks import registry
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.compression import distillation
from adcorda_jax.evaluate.evaluator import labels_fn
from adcorda_jax.models import create_model
from adcorda_jax.native import conv2d as native_conv
from adcorda_jax.quant.fake_quant import QuantSpec
from adcorda_jax.quant.quantized_model import quantized_apply_fn, quantized_logits_fn
from adcorda_jax.shift.corruptions import CORRUPTIONS, corrupt, corruption_names
from adcorda_jax.training import finetune, steps

PLATFORMS = ("cuda", "tpu")
NUM_CLASSES = 10
BATCH = 4
# What must never be lowered for an accelerator: the native CPU kernels (FFI targets
# `adcorda_conv2d_cpu_*`) and host callbacks (`pure_callback`, `io_callback`, `debug.callback`).
_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call\s+@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')


def custom_call_targets(module_text: str) -> set[str]:
  """The custom-call targets in a module's StableHLO text."""
  return {a or b for a, b in _CUSTOM_CALL.findall(module_text)}


def forbidden_targets(targets: set[str]) -> set[str]:
  return {t for t in targets if t.startswith("adcorda") or "callback" in t.lower()}


def lower(fn, platform: str, *args) -> str:
  """`fn` exported for `platform`, as StableHLO text.

  `jax.export` itself refuses custom calls without a compatibility guarantee (the native kernels)
  and host callbacks with a ValueError; the scan of the text below is a second, explicit check.
  """
  return export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def _model(name: str, shape: tuple[int, ...]):
  width = {"small_cnn": 0.25, "resnet20": 0.5}[name]
  model = create_model({"name": name, "width": width}, NUM_CLASSES, mean=(0.5,), std=(0.25,))
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape))
  return model, variables


MODELS = {"small_cnn": (12, 12, 1), "resnet20": (8, 8, 3)}


@functools.cache
def model_case(name: str):
  shape = MODELS[name]
  model, variables = _model(name, shape)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(size=(BATCH,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH), jnp.int32),
           "mask": jnp.ones(BATCH, jnp.float32)}
  return model, variables, batch


def _state(model, variables, apply_fn=None):
  return steps.TrainState.create(apply_fn=apply_fn or model.apply, params=variables["params"],
                                 batch_stats=variables["batch_stats"],
                                 tx=optax.sgd(0.1, momentum=0.9, nesterov=True))


def training_programs(model_name: str, backend: str):
  """(name, fn, args) of the training-side programs, built for `backend`."""
  model, variables, batch = model_case(model_name)
  key = jax.random.key(1)
  state = _state(model, variables)
  programs = [
      ("train_step", functools.partial(steps.train_step, num_classes=NUM_CLASSES,
                                       augment_padding=2, backend=backend), (state, batch, key)),
      ("train_step_bfloat16", functools.partial(
          steps.train_step, num_classes=NUM_CLASSES, backend=backend),
       (_state(model.clone(dtype=jnp.bfloat16), variables), batch, key)),
      ("eval_step", functools.partial(steps.eval_step, model.apply, num_classes=NUM_CLASSES,
                                      backend=backend), (variables, batch)),
      ("predictor", labels_fn(model.apply, backend), (variables, batch["image"])),
  ]
  for alignment in ("coral", "mmd"):
    programs.append((f"adcorda_step_{alignment}", functools.partial(
        finetune.finetune_step, num_classes=NUM_CLASSES, alignment=alignment_loss(alignment),
        lambda_=1.0, train_batch_norm=True, backend=backend), (state, batch, batch, key)))
  qat_apply = quantized_apply_fn(model, QuantSpec(bits=4, per_channel=True, symmetric=True))
  programs.append(("qat_step", functools.partial(
      finetune.finetune_step, num_classes=NUM_CLASSES, alignment=None, lambda_=0.0,
      train_batch_norm=True, backend=backend), (_state(model, variables, qat_apply), batch,
                                                 None, key)))
  tx = optax.sgd(0.1)
  distill_state = distillation.DistillState.create_joint(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      projection={}, tx=tx)
  distill = functools.partial(
      distillation.distill_step, teacher_apply=model.apply, num_classes=NUM_CLASSES, alpha=0.5,
      temperature=4.0, beta=0.0, backend=backend)
  programs.append(("distill_step", lambda state, batch, key, teacher: distill(
      state, batch, key, teacher_variables=teacher), (distill_state, batch, key, variables)))
  return programs


def attack_programs(model_name: str, backend: str):
  """(name, fn, args) of every registered attack on `model_name`, built for `backend`."""
  model, variables, batch = model_case(model_name)
  logits_fn, params = attack_model(model, variables, backend=backend)
  key = jax.random.key(2)
  programs = []
  for name in registry.attack_names():
    if name == "autoattack":  # Host-driven cascade of the components lowered here.
      continue
    spec = AttackSpec(name=name, steps=2, restarts=1, target_classes=2)

    def run(params, x, labels, key, spec=spec):
      return spec.run(logits_fn, params, x, labels, key, 8 / 255).adversarial
    programs.append((f"attack_{name}", run, (params, batch["image"], batch["label"], key)))
  quantized = quantized_logits_fn(model, QuantSpec(bits=4, per_channel=True, symmetric=True),
                                  straight_through=False)
  spec = AttackSpec(name="pgd", steps=2)
  programs.append(("attack_pgd_quantized_bpda", lambda params, x, labels, key: spec.run(
      quantized, params, x, labels, key, 8 / 255).adversarial,
      (variables, batch["image"], batch["label"], key)))
  return programs


def corruption_programs():
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 12, 12, 3)), jnp.float32)
  return [(f"corrupt_{name}", functools.partial(corrupt, name=name, severity=3),
           (jax.random.key(4), images)) for name in corruption_names(3)]


def _lower_all(programs, platform):
  table = {}
  for name, fn, args in programs:
    table[name] = custom_call_targets(lower(fn, platform, *args))
  return table


def test_corruption_names_are_all_covered():
  assert set(corruption_names(3)) == set(CORRUPTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_training_programs_lower_for_accelerators(platform, model_name):
  table = _lower_all(training_programs(model_name, platform), platform)
  assert len(table) == 8
  bad = {name: forbidden_targets(targets) for name, targets in table.items()
         if forbidden_targets(targets)}
  assert not bad, f"CPU-only custom calls or host callbacks lowered for {platform}: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_attacks_lower_for_accelerators(platform, model_name):
  table = _lower_all(attack_programs(model_name, platform), platform)
  assert {f"attack_{n}" for n in registry.attack_names() if n != "autoattack"} <= set(table)
  bad = {name: forbidden_targets(targets) for name, targets in table.items()
         if forbidden_targets(targets)}
  assert not bad, f"CPU-only custom calls or host callbacks lowered for {platform}: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_corruptions_lower_for_accelerators(platform):
  table = _lower_all(corruption_programs(), platform)
  bad = {name: forbidden_targets(targets) for name, targets in table.items()
         if forbidden_targets(targets)}
  assert not bad, f"custom calls or host callbacks lowered for {platform}: {bad}"


@pytest.mark.slow
@pytest.mark.skipif(not native_conv.available(), reason="native CPU kernel not built")
def test_the_cpu_path_does_contain_the_native_kernels():
  """The control: built for the CPU, the check flags the native kernels (so it can fail)."""
  programs = dict((name, (fn, args)) for name, fn, args in
                  training_programs("resnet20", "cpu") + attack_programs("resnet20", "cpu"))
  for name in ("train_step", "adcorda_step_coral", "predictor", "attack_pgd", "attack_correct"):
    fn, args = programs[name]
    targets = custom_call_targets(jax.jit(fn).lower(*args).as_text())
    with pytest.raises(ValueError, match="custom call"):  # And jax.export refuses it.
      lower(fn, "cpu", *args)
    assert any(t.startswith("adcorda_conv2d_cpu") for t in forbidden_targets(targets)), (
        name, targets)


def test_host_callbacks_are_detected():
  def with_callback(x):
    jax.debug.callback(lambda v: None, x)
    return x * 2
  x = jnp.ones(3)
  assert forbidden_targets(custom_call_targets(jax.jit(with_callback).lower(x).as_text()))
  # jax.export refuses it too (NotImplementedError: host callbacks cannot be serialized).
  with pytest.raises((ValueError, NotImplementedError)):
    lower(with_callback, "cuda", x)
