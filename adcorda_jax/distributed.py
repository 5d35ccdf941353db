"""Multi-process runs: `jax.distributed.initialize` from the config, barriers, host-side gathers.

`config.distributed=True` starts one JAX process per host (or per GPU, or several CPU processes
on one machine). Where they find each other comes from the config, else from the environment:

    config.coordinator_address  "host:port" of process 0's coordination service; "" = auto
                                ($JAX_COORDINATOR_ADDRESS, or SLURM / Open MPI / Cloud TPU).
    config.num_processes        how many processes the run has; 0 = auto.
    config.process_id           this process's index, 0 .. num_processes - 1; -1 = auto.
    config.distributed_timeout_seconds
                                how long a process waits for its peers to connect, and JAX's
                                heartbeat timeout: how long a silent peer goes unnoticed by
                                processes not waiting on it; 0 = JAX's defaults (300 s, 100 s).

A process that stops (killed, crashed, or failed with an error: then it exits at once, see
`exit_with`) closes its connections, so a peer waiting on it in a collective stops within
seconds with one line naming it (`lost_peer_line`). When process 0, which runs the coordination
service, is the one lost, JAX's runtime may end the others first, with its own message ("the
leader task was preempted/died"). Rerunning every process resumes from the last checkpoint.

These keys describe how the machine is split into processes, not what the run computes: they are
among `pipeline.fingerprint.RESUMABLE_KEYS`, so every process of a run (each with its own
`process_id`) and a rerun on another port or process count have the same run fingerprint.

Process 0 is the writer (`workdir.is_writer`): it alone writes artifacts, locks the workdir and
prints progress. The others compute their share of every global batch and read the workdir.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import socket
import sys
import time
from typing import Any, NoReturn

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax.errors import ConfigError

KEYS = ("coordinator_address", "num_processes", "process_id", "distributed_timeout_seconds")
AUTO = {"coordinator_address": "", "num_processes": 0, "process_id": -1,
        "distributed_timeout_seconds": 0}
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_barrier_count = itertools.count()
_PEER_KEY = "adcorda_jax/peer/"
_peers: dict[int, str] = {}  # Process index -> "host, pid", recorded at initialization.
# How the JAX runtime words a collective or coordination failure caused by a peer that stopped.
_LOST_PEER = re.compile(
    r"Gloo|Connection (closed|reset|refused)|[Cc]oordination ?[Ss]ervice|heartbeat|"
    r"Barrier (timed out|failed)|UNAVAILABLE|Socket closed|connection to .* lost")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """What `jax.distributed.initialize` is called with; None fields are auto-detected."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  timeout_seconds: int | None

  def initialize_kwargs(self) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"coordinator_address": self.coordinator_address,
                              "num_processes": self.num_processes,
                              "process_id": self.process_id}
    if self.timeout_seconds is not None:
      kwargs["initialization_timeout"] = self.timeout_seconds
      kwargs["heartbeat_timeout_seconds"] = self.timeout_seconds
    return kwargs


def _int(config: ml_collections.ConfigDict, key: str, lowest: int, what: str) -> int:
  value = config.get(key, AUTO[key])
  if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
    raise ConfigError(f"config.{key} must be an integer >= {lowest} ({what}), got {value!r}")
  return value


def read_settings(config: ml_collections.ConfigDict) -> DistributedSettings | None:
  """The validated multi-process settings, or None for a single-process run.

  Every bad value is a one-line ConfigError naming its key.
  """
  distributed = config.get("distributed", False)
  if not isinstance(distributed, bool):
    raise ConfigError(f"config.distributed must be True or False, got {distributed!r}")
  address = config.get("coordinator_address", AUTO["coordinator_address"])
  if not isinstance(address, str) or (address and not _valid_address(address)):
    raise ConfigError(f"config.coordinator_address must be 'host:port' (port 1-65535) or '' "
                      f"(auto-detect), got {address!r}")
  num_processes = _int(config, "num_processes", 0, "0 = auto-detect")
  process_id = _int(config, "process_id", -1, "-1 = auto-detect")
  timeout = _int(config, "distributed_timeout_seconds", 0, "0 = JAX's defaults")
  if not distributed:
    for key in KEYS:
      if config.get(key, AUTO[key]) != AUTO[key]:
        raise ConfigError(f"config.{key}={config.get(key)!r} is set but config.distributed is "
                          "False; add --config.distributed=True for a multi-process run")
    return None
  if num_processes and process_id >= num_processes:
    raise ConfigError(f"config.process_id={process_id} must be below "
                      f"config.num_processes={num_processes}")
  return DistributedSettings(coordinator_address=address or None,
                             num_processes=num_processes or None,
                             process_id=None if process_id < 0 else process_id,
                             timeout_seconds=timeout or None)


def _valid_address(address: str) -> bool:
  match = _ADDRESS.match(address)
  return match is not None and 1 <= int(match.group(2)) <= 65535


def initialize(settings: DistributedSettings) -> None:
  """`jax.distributed.initialize` with `settings`; on the CPU backend with the gloo collectives.

  Must run before any device is touched. A missing setting that no cluster environment
  provides, or a coordinator that does not answer within the timeout, is a one-line
  ConfigError naming the keys to set.
  """
  if jax.config.jax_cpu_collectives_implementation is None:
    # The CPU backend's cross-process collectives (gloo over TCP: nothing else to install;
    # JAX 0.10's default, chosen here in case an environment variable turned it off). The
    # option only affects the CPU client; "mpi" chosen by the user is kept.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = settings.timeout_seconds or 300  # jax.distributed.initialize's default.
  if settings.coordinator_address and settings.process_id:
    _wait_for_coordinator(settings.coordinator_address, settings.process_id, timeout)
  try:
    jax.distributed.initialize(**settings.initialize_kwargs())
  except ValueError as e:  # JAX's words for a value neither given nor auto-detected.
    raise ConfigError(
        f"config.distributed=True: {e} (no SLURM, Open MPI or Cloud TPU environment supplied "
        "it); set config.coordinator_address='host:port', config.num_processes and "
        "config.process_id") from None
  except jax.errors.JaxRuntimeError as e:
    raise ConfigError(
        f"config.distributed=True: process {settings.process_id} could not join the run at "
        f"config.coordinator_address={settings.coordinator_address!r} within {timeout} s "
        f"({_first_line(e)}); start every process of the run with the same coordinator "
        "address, each with its own config.process_id") from None
  _record_peers()
  logging.info("jax.distributed: process %d of %d, coordinator %s.", jax.process_index(),
               jax.process_count(), coordinator_address())


def _wait_for_coordinator(address: str, process_id: int, timeout: float) -> None:
  """Waits until process 0's coordination service accepts connections at `address`.

  JAX would wait as long, then abort the process with a stack trace; this is the one line.
  """
  host, port = address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(
            f"config.coordinator_address={address!r}: process {process_id} found no "
            f"coordinator there within {timeout:.0f} s ({e.strerror or e}); start process 0 "
            "(config.process_id=0) of the run with that address, or correct it") from None
      time.sleep(0.5)


def coordinator_address() -> str | None:
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.coordinator_address


def _client() -> Any:
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def _record_peers() -> None:
  """Shares every process's host and pid through the coordination service, for the message
  that names a lost peer (once a peer is lost, the service may be gone with it)."""
  client = _client()
  if client is None:
    return
  me = jax.process_index()
  client.key_value_set(f"{_PEER_KEY}{me}", f"host {socket.gethostname()}, pid {os.getpid()}")
  for index in range(jax.process_count()):
    _peers[index] = client.blocking_key_value_get(f"{_PEER_KEY}{index}", 60_000)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return (text.splitlines()[0] if text else type(error).__name__)[:300]


def lost_peer_line(error: BaseException | None) -> str | None:
  """The one line for a multi-process run whose peer stopped, or None if `error` is not that.

  A killed or crashed process closes its connections: a collective waiting on it fails at
  once (gloo on CPU) with a JaxRuntimeError, possibly wrapped in another error. With two
  processes the lost one is the other; with more, any other.
  """
  if error is None or not is_multiprocess():
    return None
  chain = []
  while error is not None and all(error is not seen for seen in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  runtime = next((e for e in chain if isinstance(e, jax.errors.JaxRuntimeError)
                  and _LOST_PEER.search(str(e))), None)
  if runtime is None:
    return None
  me, count = jax.process_index(), jax.process_count()
  others = [index for index in range(count) if index != me]
  if len(others) == 1:
    peer = others[0]
    role = f", the coordinator at {coordinator_address()}" if peer == 0 else ""
    known = f" ({_peers[peer]}{role})" if peer in _peers else (f" ({role[2:]})" if role else "")
    who = f"process {peer} of {count}{known}"
  else:
    who = f"another process of this {count}-process run (this is process {me})"
  return (f"lost contact with {who}: {_first_line(runtime)}; it stopped (killed, crashed or "
          "failed: see its log); rerun every process with the same command to resume from the "
          "last checkpoint")


def exit_with(line: str) -> NoReturn:
  """Exits with status 1 and `line` on stderr: at once (`exit_now`) in a multi-process run."""
  if is_multiprocess():
    exit_now(line)
  sys.exit(line)


def exit_with_traceback() -> None:
  """In a multi-process run, prints the exception being handled and exits at once (status 1);
  otherwise returns (the caller re-raises it)."""
  if is_multiprocess():
    import traceback
    traceback.print_exc()
    exit_now(f"error: process {jax.process_index()} failed (traceback above)")


def exit_now(line: str, code: int = 1) -> NoReturn:
  """Prints `line` and exits at once, without JAX's exit-time shutdown.

  That shutdown waits at a barrier for every process (up to minutes, then aborts): after an
  error the others may never come. Exiting closes this process's connections instead, so a
  peer waiting on it stops with `lost_peer_line` at once.
  """
  print(line, file=sys.stderr)
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  logging.flush()
  os._exit(code)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (no-op with one process).

  Every process must pass the same barriers in the same order: the name carries a running
  count, so a process that took a different path fails the barrier instead of passing another.
  """
  if not is_multiprocess():
    return
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f"adcorda:{next(_barrier_count)}:{name}")


def gather_to_host(tree: Any) -> Any:
  """A pytree of (possibly globally sharded) arrays as numpy on every process.

  Replicated arrays are read from a local copy; arrays sharded over processes are all-gathered,
  a collective: every process must call this with the same tree, in the same order.
  """
  return jax.tree.map(_leaf_to_host, tree)


def _leaf_to_host(leaf: Any) -> np.ndarray:
  if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
    return np.asarray(jax.device_get(leaf))
  if leaf.is_fully_replicated:
    return np.asarray(leaf.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
