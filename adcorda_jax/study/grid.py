"""The compression study's grid: networks x methods x compression rates, read from `study`.

    study.networks = ("small_cnn:1.0", "small_cnn:0.5")    # model.name:width, larger first
    study.methods = "filter_pruning,magnitude_pruning,distillation,ptq"
    study.rates.filter_pruning = (0.5, 0.75)    # fraction of each layer's filters removed
    study.rates.magnitude_pruning = (0.5, 0.9)  # fraction of all kernel weights set to zero
    study.rates.distillation = (0.5,)           # student width as a fraction of the teacher's
    study.rates.ptq = (8, 4)                    # weight bits

Each (network, method, rate, seed) is one `Cell`, computed once and cached in the workdir. The
methods and what their rates mean come from `study.methods.COMPRESSION_METHODS`; their own
settings (e.g. `study.magnitude_scope`) are read by `methods.read_method_settings`. Every bad entry
is a one-line ConfigError naming its key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from adcorda_jax.errors import ConfigError
from adcorda_jax.models import MODELS
from adcorda_jax.study.methods import COMPRESSION_METHODS


@dataclasses.dataclass(frozen=True)
class Network:
  """One original network of the study: a registered model at a width."""
  label: str        # "large", "small", or "net<k>" beyond two.
  name: str
  width: float

  def model_config(self, base: dict[str, Any]) -> dict[str, Any]:
    """`base` (the config's `model` section) with this network's name and width."""
    config = {k: v for k, v in base.items() if k not in ("quant", "channels")}
    return {**config, "name": self.name, "width": self.width}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One compressed network: `method` at `rate` applied to `network`, fine-tuned with `seed`."""
  network: Network
  method: str
  rate: float
  seed: int

  @property
  def name(self) -> str:
    return f"{self.method}_{COMPRESSION_METHODS.get(self.method).rate_label(self.rate)}"

  @property
  def path(self) -> str:
    return f"{self.network.label}/{self.name}/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """The validated `study` section."""
  networks: tuple[Network, ...]
  methods: tuple[str, ...]
  rates: dict[str, tuple[float, ...]]
  seeds: tuple[int, ...]
  plot_corruptions: bool

  def cells(self) -> list[Cell]:
    """Every cell; a method that does not train (PTQ) runs once (first seed), not per seed."""
    return [Cell(network, method, rate, seed) for network in self.networks
            for method in self.methods for rate in self.rates[method]
            for seed in (self.seeds if COMPRESSION_METHODS.get(method).trains
                         else self.seeds[:1])]


def _network(entry: Any, index: int, count: int) -> Network:
  key = f"study.networks[{index}]"
  if not isinstance(entry, str) or entry.count(":") != 1:
    raise ConfigError(f"{key} must be 'model_name:width' such as 'small_cnn:0.5', got {entry!r}")
  name, width_text = entry.split(":")
  if name not in MODELS.names():
    raise ConfigError(f"{key}: unknown model {name!r}; valid names: {', '.join(MODELS.names())}")
  try:
    width = float(width_text)
  except ValueError:
    width = -1.0
  if not width > 0:
    raise ConfigError(f"{key}: width must be a number > 0, got {width_text!r}")
  label = ("large", "small")[index] if count == 2 else f"net{index}"
  return Network(label=label, name=name, width=width)


def _rates(section: ml_collections.ConfigDict, method: str) -> tuple[float, ...]:
  key = f"study.rates.{method}"
  rates = section.get(method, None) if section is not None else None
  values = (rates,) if isinstance(rates, (int, float)) and not isinstance(rates, bool) else rates
  if not isinstance(values, (tuple, list)) or not values or len(set(values)) != len(values):
    raise ConfigError(f"{key} must be a non-empty tuple of distinct rates, got {rates!r}")
  for value in values:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key} entries must be numbers, got {value!r}")
    COMPRESSION_METHODS.get(method).check_rate(value, key)
  return tuple(float(v) for v in values)


def read_study_settings(config: ml_collections.ConfigDict) -> StudySettings:
  """Checks `config.study`; one-line ConfigErrors name the key."""
  section = config.get("study")
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'study' section; start from configs/compression_digits.py")
  entries = section.get("networks", ())
  if not isinstance(entries, (tuple, list)) or not entries:
    raise ConfigError(f"study.networks must be a non-empty tuple of 'model_name:width', "
                      f"got {entries!r}")
  networks = tuple(_network(entry, i, len(entries)) for i, entry in enumerate(entries))
  if len({(n.name, n.width) for n in networks}) != len(networks):
    raise ConfigError(f"study.networks lists a network twice: {entries!r}")
  methods_text = section.get("methods", ",".join(COMPRESSION_METHODS.registered()))
  if not isinstance(methods_text, str):
    raise ConfigError(f"study.methods must be a comma-separated string, got {methods_text!r}")
  methods = tuple(m.strip() for m in methods_text.split(",") if m.strip())
  for method in methods:
    COMPRESSION_METHODS.get(method, "study.methods")
  if not methods or len(set(methods)) != len(methods):
    raise ConfigError(f"study.methods must name distinct methods, got {methods_text!r}")
  seeds = section.get("seeds", (0,))
  if (not isinstance(seeds, (tuple, list)) or not seeds or len(set(seeds)) != len(seeds)
      or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
    raise ConfigError(f"study.seeds must be a non-empty tuple of distinct integers >= 0, "
                      f"got {seeds!r}")
  return StudySettings(
      networks=networks, methods=methods,
      rates={method: _rates(section.get("rates"), method) for method in methods},
      seeds=tuple(seeds),
      plot_corruptions=bool(section.get("plot_corruptions", True)))
