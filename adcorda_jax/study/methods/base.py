"""What a compression method of the study is, and the registry that names them.

A method is one `CompressionMethod` instance registered under its name: it validates its
`study.rates.<name>` entries, labels a rate in cell names, says which config its cells depend on
(their fingerprint), reads its settings up front and compresses one network. The grid, the
compressor, the study task and the findings read these entries, so adding a method is one module
with one `register_method(...)` call.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import flax.linen as nn
import ml_collections

from adcorda_jax.errors import ConfigError
from adcorda_jax.pipeline.fingerprint import config_keys
from adcorda_jax.registry import Registry
from adcorda_jax.training.finetune import without_alignment

if TYPE_CHECKING:
  from adcorda_jax.study.compress import Compressor
  from adcorda_jax.study.grid import Cell

# Every cell fingerprint has recorded this key since the first study workdirs (None unless the
# method is magnitude pruning); it stays so their fingerprints are unchanged byte for byte.
_RECORDED_KEYS: dict[str, Any] = {"study.magnitude_scope": None}


@dataclasses.dataclass(frozen=True)
class Original:
  """The network a cell compresses: its module, variables, model config and checkpoint meta."""
  model: nn.Module
  variables: dict[str, Any]
  model_config: dict[str, Any]
  meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A cell's compressed network and what it costs."""
  model: nn.Module
  variables: dict[str, Any]
  model_config: dict[str, Any]
  size_bytes: int
  details: dict[str, Any]


class CompressionMethod(abc.ABC):
  """One compression method; subclass it and register an instance with `register_method`."""
  name: str = ""
  family: str = ""  # "pruning", "distillation", "quantization": the groups findings compare.
  # Whether the method trains, so each seed is its own cell; one that does not (PTQ) runs once,
  # with the first seed.
  trains: bool = True
  # The config sections a cell's result depends on, besides the original network's.
  config_sections: tuple[str, ...] = ("train", "adapt", "model")

  @abc.abstractmethod
  def check_rate(self, rate: float, key: str) -> None:
    """Raises a one-line ConfigError naming `key` if `rate` is not a valid rate of the method."""

  def rate_label(self, rate: float) -> str:
    """The rate as it appears in cell names and folders (`<method>_<label>`)."""
    return f"{rate:g}"

  def read_settings(self, config: ml_collections.ConfigDict) -> Any:
    """The method's validated settings, read before any work starts (None: it has none)."""
    return None

  def fingerprint_keys(self, settings: Any) -> dict[str, Any]:
    """Settings outside `config_sections` that change a cell's result, as {dotted key: value}."""
    return {}

  @abc.abstractmethod
  def compress(self, compressor: Compressor, cell: Cell, original: Original, settings: Any,
               directory: Path) -> Compressed:
    """The compressed (and fine-tuned) network of `cell`; training checkpoints in `directory`."""

  def cell_fingerprint(self, config: ml_collections.ConfigDict, cell: Cell,
                       settings: Any) -> dict[str, Any]:
    """Everything a cell of this method depends on beyond its original network."""
    return {**_RECORDED_KEYS, **self.fingerprint_keys(settings), "cell": cell.path,
            **without_alignment(config_keys(config, self.config_sections))}


COMPRESSION_METHODS: Registry[CompressionMethod] = Registry("compression method")
M = TypeVar("M", bound=CompressionMethod)


def register_method(method: M) -> M:
  """Registers `method` under `method.name`; the one line a method module adds."""
  COMPRESSION_METHODS.register(method.name)(method)
  return method


def check_fraction(rate: float, key: str, meaning: str) -> None:
  """The rate check of methods whose rates are fractions in (0, 1)."""
  if not 0 < rate < 1:
    raise ConfigError(f"{key} entries are {meaning}, in (0, 1); got {rate!r}")


def read_method_settings(config: ml_collections.ConfigDict, methods: tuple[str, ...]
                         ) -> dict[str, Any]:
  """{method: its settings} for the study's `methods`, each checked before work starts."""
  return {name: COMPRESSION_METHODS.get(name, "study.methods").read_settings(config)
          for name in methods}
