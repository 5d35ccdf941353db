"""`model.quant`: how a float checkpoint becomes the network tasks evaluate, attack and fine-tune.

A `Deployment` is that recipe: `FloatDeployment` (no `model.quant`: the network as trained) or
`Quantization` (weight-quantized), so a task runs the same code for both.

Quantization is applied to *parameters*, never to the model definition, so every registered model
and every consumer (evaluation, attacks and their fast input-gradient path, fine-tuning) works
unchanged:

* post-training quantization (PTQ): `ptq_variables` calibrates the kernels' grids
  (`model.quant.calibration`, optionally after folding BatchNorm) and returns variables whose
  kernels are the dequantized integers. The plain model on them *is* the weight-quantized network.
* quantization-aware fine-tuning (QAT): `qat_apply_fn` is `model.apply` on fake-quantized kernels
  (min-max grid of the current weights, straight-through gradient to the float "shadow" weights);
  `qat_variables` gives the network those shadow weights deploy as (the same grid).

Attack gradients: with weights-only quantization the input gradient of the network above is exact
(weights are constants with respect to the input), so attacks see no gradient masking. Quantized
*activations* (`activation_bits`, task=quantize only) put a rounding step between layers whose
straight-through gradient can mislead an attack; `model.quant.attack_gradient="bpda"` attacks with
the float model's gradient instead (see `quantized_model.quantized_logits_fn`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.errors import ConfigError
from adcorda_jax.quant.calibration import CALIBRATION_METHODS, calibrate_weights
from adcorda_jax.quant.export import model_size_bytes
from adcorda_jax.quant.fake_quant import (QuantSpec, activation_spec_from_config,
                                          quant_spec_from_config)
from adcorda_jax.quant.quantized_model import (ApplyFn, fake_quantize_params, fold_batch_norm,
                                               quantized_apply_fn)

PREFIX = "model.quant"
ATTACK_GRADIENTS = ("ste", "bpda")


class Deployment(Protocol):
  """How trained float variables become the network that is evaluated and attacked."""

  def deploy(self, variables: dict[str, Any]) -> dict[str, Any]:
    """The deployed network's variables, from a float checkpoint's (post-training)."""

  def train_apply_fn(self, model: nn.Module) -> ApplyFn | None:
    """What fine-tuning differentiates (None: `model.apply`)."""

  def trained(self, variables: dict[str, Any]) -> dict[str, Any]:
    """The deployed network's variables, from fine-tuned ones (after `train_apply_fn`)."""

  def size_bytes(self, params: Any) -> int:
    """The deployed network's parameter storage in bytes."""

  def fingerprint(self) -> dict[str, Any]:
    """Flat dotted config keys of everything that changes the deployed network."""

  def summary(self, params: Any) -> dict[str, Any] | None:
    """What results.json records of the deployment (None for a float network)."""


@dataclasses.dataclass(frozen=True)
class FloatDeployment:
  """The network as trained: float32 weights, nothing changed."""

  def deploy(self, variables: dict[str, Any]) -> dict[str, Any]:
    return variables

  def train_apply_fn(self, model: nn.Module) -> ApplyFn | None:
    return None

  def trained(self, variables: dict[str, Any]) -> dict[str, Any]:
    return variables

  def size_bytes(self, params: Any) -> int:
    return model_size_bytes(params)

  def fingerprint(self) -> dict[str, Any]:
    return {}

  def summary(self, params: Any) -> dict[str, Any] | None:
    return None


@dataclasses.dataclass(frozen=True)
class Quantization:
  """The validated `model.quant` section (weights quantized; activations optionally)."""
  spec: QuantSpec
  calibration: str
  fold_batch_norm: bool
  activation_spec: QuantSpec | None
  attack_gradient: str

  @property
  def tag(self) -> str:
    """Short name of the bit width, e.g. `w4` or `w8a8`."""
    activations = f"a{self.activation_spec.bits}" if self.activation_spec else ""
    return f"w{self.spec.bits}{activations}"

  def fingerprint(self) -> dict[str, Any]:
    """Flat dotted keys of everything that changes the quantized network."""
    return {f"{PREFIX}.weight_bits": self.spec.bits,
            f"{PREFIX}.per_channel": self.spec.per_channel,
            f"{PREFIX}.symmetric": self.spec.symmetric,
            f"{PREFIX}.calibration": self.calibration,
            f"{PREFIX}.fold_batch_norm": self.fold_batch_norm,
            f"{PREFIX}.activation_bits": self.activation_spec.bits if self.activation_spec else 0}

  def with_spec(self, spec: QuantSpec) -> "Quantization":
    return dataclasses.replace(self, spec=spec)

  def ptq_variables(self, variables: dict[str, Any]) -> dict[str, Any]:
    """Post-training quantized `variables`: calibrated grids, kernels dequantized."""
    variables, scales = self.ptq_scales(variables)
    return {**variables, "params": fake_quantize_params(variables["params"], scales, self.spec)}

  def ptq_scales(self, variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the variables PTQ calibrates — BN folded when configured —, their kernel grids)."""
    if self.fold_batch_norm:
      variables = fold_batch_norm(variables)
    return variables, calibrate_weights(variables["params"], self.spec, self.calibration)

  def qat_apply_fn(self, model: nn.Module) -> ApplyFn:
    """`model.apply` with min-max fake-quantized kernels and a straight-through gradient."""
    return quantized_apply_fn(model, self.spec)

  def qat_variables(self, variables: dict[str, Any]) -> dict[str, Any]:
    """The network QAT's shadow weights deploy as: the min-max grid the training step used."""
    return {**variables, "params": fake_quantize_params(variables["params"], None, self.spec)}

  def size_bytes(self, params: Any) -> int:
    return model_size_bytes(params, self.spec)

  @property
  def granularity(self) -> str:
    return "per_channel" if self.spec.per_channel else "per_tensor"

  # The Deployment protocol: PTQ deploys a checkpoint, QAT fine-tunes through fake quantization.
  def deploy(self, variables: dict[str, Any]) -> dict[str, Any]:
    return self.ptq_variables(variables)

  def train_apply_fn(self, model: nn.Module) -> ApplyFn | None:
    return self.qat_apply_fn(model)

  def trained(self, variables: dict[str, Any]) -> dict[str, Any]:
    return self.qat_variables(variables)

  def summary(self, params: Any) -> dict[str, Any] | None:
    return {"weight_bits": self.spec.bits, "per_channel": self.spec.per_channel,
            "symmetric": self.spec.symmetric, "calibration": self.calibration,
            "float_size_bytes": model_size_bytes(params), "size_bytes": self.size_bytes(params)}


def quantization_from_config(model_config: ml_collections.ConfigDict | None
                             ) -> Quantization | None:
  """`model.quant` checked (one-line ConfigErrors naming the key); None when weight_bits is 0."""
  section = model_config.get("quant") if model_config is not None else None
  if section is None:
    return None
  spec = quant_spec_from_config(section, PREFIX)
  activation_spec = activation_spec_from_config(section, PREFIX)
  calibration = config_checks.one_of(section, "calibration", PREFIX, CALIBRATION_METHODS,
                                     default="mse")
  attack_gradient = config_checks.one_of(section, "attack_gradient", PREFIX, ATTACK_GRADIENTS,
                                         default="ste")
  fold = section.get("fold_batch_norm", False)
  if not isinstance(fold, bool):
    raise ConfigError(f"{PREFIX}.fold_batch_norm must be True or False, got {fold!r}")
  if spec is None:
    if activation_spec is not None:
      raise ConfigError(f"{PREFIX}.activation_bits needs {PREFIX}.weight_bits > 0 too")
    return None
  return Quantization(spec=spec, calibration=calibration, fold_batch_norm=fold,
                      activation_spec=activation_spec, attack_gradient=attack_gradient)


def float_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
  """A plain `model` config dict without its `quant` section (what a float baseline trains)."""
  return {k: v for k, v in model_config.items() if k != "quant"}
