"""Multi-process runs: two real `python main.py` processes on this machine (CPU, gloo collectives).

Each process has one CPU device; process 0 hosts the coordination service on a free port of
127.0.0.1. The subprocess tests check that a two-process run of `task=train`, `task=robustness`
and `task=adcorda` gives the one-process results, that only process 0 writes into the workdir
(process 1 writes only its own shards of orbax checkpoints, seen with strace when it is there),
that checkpoints are written once and a rerun resumes, and that a peer killed with SIGKILL stops
the other process at once with a message naming it.

The training sequence is shared by several tests (`killed_and_resumed`): a run killed at its
first checkpoint (process 1 SIGKILLed), rerun and killed at its second (process 0, the
coordinator, SIGKILLed), then rerun to the end. Its final results must equal the session's
one-process `configs/tiny.py` run (`tiny_baseline`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from adcorda_jax import distributed
from adcorda_jax.errors import ConfigError
from adcorda_jax.pipeline import fingerprint
from adcorda_jax.tasks import adcorda, robustness
from adcorda_jax.training import checkpointing
from configs import adcorda_digits, robustness as robustness_config, tiny
from tests.helpers import one_line, override

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 420      # Seconds a whole two-process run may take (they take ~20-90 s here).
SURVIVOR_TIMEOUT = 120  # Seconds the survivor of a killed peer may take to exit.
PEER_TIMEOUT = 60      # config.distributed_timeout_seconds of every run here.
ROBUSTNESS = {"robustness.eps": (0.0, 8 / 255), "robustness.max_examples": 64,
              "robustness.batch_size": 32, "robustness.pgd.steps": 4,
              "robustness.apgd.steps": 4}
ADCORDA = {"adcorda.seeds": (0,), "adcorda.plot_examples": 2, "data.max_train_examples": 384,
           "correct.steps": 5, "correct.batch_size": 32, "adapt.epochs": 1,
           "adapt.log_every_steps": 4, "evaluate.attacks": "pgd", "evaluate.max_examples": 32,
           "evaluate.batch_size": 32, "evaluate.pgd.steps": 3}
# What process 1 may write under the workdir: its own shards of a checkpoint being saved.
_OWN_SHARDS = re.compile(r"\.orbax-checkpoint-tmp[^/]*/(.*/)?(ocdbt\.process_1|"
                         r"array_metadatas/process_1)(/|\.|$)")


# ---------------------------------------------------------------------------------------------
# Settings (no subprocess).


def _settings_config(**values: Any) -> ml_collections.ConfigDict:
  """Just the top-level keys `read_settings` reads (the others at their defaults)."""
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize("values, key", [
    ({"distributed": True, "coordinator_address": "localhost"}, "config.coordinator_address"),
    ({"distributed": True, "coordinator_address": "10.0.0.1:0"}, "config.coordinator_address"),
    ({"distributed": True, "coordinator_address": "h:70000"}, "config.coordinator_address"),
    ({"distributed": True, "coordinator_address": 8476}, "config.coordinator_address"),
    ({"distributed": True, "num_processes": -1}, "config.num_processes"),
    ({"distributed": True, "num_processes": 2.0}, "config.num_processes"),
    ({"distributed": True, "process_id": -2}, "config.process_id"),
    ({"distributed": True, "num_processes": 2, "process_id": 2}, "config.process_id"),
    ({"distributed": True, "distributed_timeout_seconds": -5},
     "config.distributed_timeout_seconds"),
    ({"distributed": 1}, "config.distributed"),
    ({"num_processes": 2}, "config.num_processes"),
    ({"coordinator_address": "127.0.0.1:1234"}, "config.coordinator_address"),
])
def test_bad_settings_are_one_line_config_errors_naming_the_key(values, key):
  with pytest.raises(ConfigError) as error:
    distributed.read_settings(_settings_config(**values))
  assert key in one_line(error)


def test_settings_reach_jax_distributed_initialize():
  assert distributed.read_settings(tiny.get_config()) is None  # One process: nothing to do.
  explicit = distributed.read_settings(_settings_config(
      distributed=True, coordinator_address="127.0.0.1:8476", num_processes=2, process_id=1,
      distributed_timeout_seconds=30))
  assert explicit.initialize_kwargs() == {
      "coordinator_address": "127.0.0.1:8476", "num_processes": 2, "process_id": 1,
      "initialization_timeout": 30, "heartbeat_timeout_seconds": 30}
  auto = distributed.read_settings(_settings_config(distributed=True))  # SLURM, TPU, ...
  assert auto.initialize_kwargs() == {"coordinator_address": None, "num_processes": None,
                                      "process_id": None}
  ipv6 = distributed.read_settings(_settings_config(distributed=True,
                                                    coordinator_address="[::1]:8476"))
  assert ipv6.coordinator_address == "[::1]:8476"


def test_per_process_keys_are_not_part_of_a_run_fingerprint():
  """Each process of a run has its own process_id, a rerun may use another port or process
  count: none of that may make a workdir refuse the run, nor a stage redo its work."""
  def config_of(process_id: int, port: int, processes: int) -> dict[str, Any]:
    return dict(tiny.get_config().to_dict(), distributed=True, process_id=process_id,
                num_processes=processes, coordinator_address=f"127.0.0.1:{port}",
                distributed_timeout_seconds=60)

  single = tiny.get_config().to_dict()
  for other in (config_of(1, 1234, 2), config_of(0, 4321, 4), single):
    assert fingerprint.differences(config_of(0, 1234, 2), other,
                                   fingerprint.RESUMABLE_KEYS) == []
  assert set(distributed.KEYS) <= fingerprint.RESUMABLE_KEYS
  for config in (tiny.get_config(), robustness_config.get_config()):  # Overridable on the CLI.
    assert {key: config[key] for key in distributed.KEYS} == distributed.AUTO


def test_lost_peer_line_is_only_for_multi_process_runs():
  import jax
  error = jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Connection closed by peer")
  assert distributed.lost_peer_line(error) is None  # This test process is a single process.


# ---------------------------------------------------------------------------------------------
# Two real processes.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _strace() -> list[str] | None:
  """The strace command that logs process 1's file writes, or None where it cannot run."""
  if shutil.which("strace") is None:
    return None
  try:
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"],
                           capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if probe.returncode != 0:  # E.g. ptrace forbidden in this container.
    return None
  calls = ("open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,"
           "link,linkat,symlink,symlinkat,truncate")
  return ["strace", "-f", "-qq", "-y", "-e", f"trace={calls}"]  # -y: the paths of fd arguments.


def _flag(key: str, value: Any) -> str:
  """The command-line override that sets config `key` to `value` (tuples and floats exactly)."""
  shown = repr(value) if isinstance(value, (tuple, float)) else str(value)
  return f"--config.{key}={shown}"


@dataclasses.dataclass
class Launch:
  """One run of `python main.py` as two processes; logs go to `logs/<name>.<i>.log`."""
  name: str
  workdir: Path
  logs: Path
  procs: list[subprocess.Popen]
  strace_log: Path | None

  @classmethod
  def start(cls, name: str, workdir: Path, logs: Path, config: str, *overrides: str,
            strace: list[str] | None = None) -> "Launch":
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ADCORDA_FAULTS")}
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = []
    strace_log = logs / f"{name}.1.strace" if strace else None
    for index in range(2):
      command = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}",
                 *overrides, "--config.distributed=True",
                 f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
                 f"--config.process_id={index}",
                 f"--config.distributed_timeout_seconds={PEER_TIMEOUT}"]
      if index == 1 and strace:
        command = [*strace, "-o", str(strace_log), *command]
      with open(logs / f"{name}.{index}.log", "w") as log:
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return cls(name, workdir, logs, procs, strace_log)

  def log(self, index: int) -> str:
    return (self.logs / f"{self.name}.{index}.log").read_text(errors="replace")

  def python_pid(self, index: int) -> int:
    """The pid of process `index`'s interpreter (strace's child when it runs under strace)."""
    pid = self.procs[index].pid
    if index == 1 and self.strace_log is not None:
      deadline = time.monotonic() + 30
      while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
          return int(children[0])
        time.sleep(0.05)
    return pid

  def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
    """Both exit codes; kills both and fails the test if they run past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    codes = []
    for index, proc in enumerate(self.procs):
      try:
        codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
      except subprocess.TimeoutExpired:
        self.kill_all()
        pytest.fail(f"{self.name}: process {index} still running after {timeout:.0f} s "
                    f"(hung); its log ends: {self.log(index)[-2000:]}")
    return codes

  def wait_ok(self) -> None:
    codes = self.wait()
    for index, code in enumerate(codes):
      assert code == 0, f"{self.name}: process {index} exited {code}: {self.log(index)[-3000:]}"

  def meanwhile(self, run: Any, *args: Any) -> Any:
    """`run(*args)` in this process while the two run (they wait on each other at times, so
    the three together take less than one after the other); kills them if it fails."""
    try:
      return run(*args)
    except BaseException:
      self.kill_all()
      raise

  def kill(self, index: int) -> None:
    os.kill(self.python_pid(index), signal.SIGKILL)

  def kill_all(self) -> None:
    for index, proc in enumerate(self.procs):
      if proc.poll() is None:
        try:
          self.kill(index)
        except (ProcessLookupError, OSError):
          pass
        proc.kill()
        proc.wait()

  def kill_at_checkpoint(self, step: int, victim: int) -> tuple[int, float]:
    """SIGKILLs process `victim` once checkpoint `step` is complete; returns the survivor's
    exit code and how many seconds it took to exit after the kill."""
    marker = self.workdir / checkpointing.CHECKPOINT_DIR / str(step) / checkpointing.INTEGRITY_FILE
    deadline = time.monotonic() + RUN_TIMEOUT
    while not marker.exists():
      if any(proc.poll() is not None for proc in self.procs) or time.monotonic() > deadline:
        self.kill_all()
        pytest.fail(f"{self.name}: no checkpoint {step} before a process exited or "
                    f"{RUN_TIMEOUT} s: {self.log(0)[-2000:]}")
      time.sleep(0.05)
    self.kill(victim)
    killed = time.monotonic()
    survivor = self.procs[1 - victim]
    try:
      code = survivor.wait(timeout=SURVIVOR_TIMEOUT)
    except subprocess.TimeoutExpired:
      self.kill_all()
      pytest.fail(f"{self.name}: process {1 - victim} hung after its peer was killed: "
                  f"{self.log(1 - victim)[-2000:]}")
    self.procs[victim].wait()
    return code, time.monotonic() - killed


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
  """{dotted key: number} of nested results (pytest.approx compares flat mappings only)."""
  return fingerprint.flatten(json.loads(json.dumps(tree)))


def _user_lines(log: str) -> list[str]:
  """Lines of a process's output that are not absl log records, tracebacks or XLA's dumps."""
  return [line for line in log.splitlines()
          if line.startswith("error:") or line.startswith("interrupted")]


def _writes(strace_log: Path, workdir: Path) -> list[str]:
  """Successful system calls of the traced process that changed something under `workdir`."""
  pending: dict[str, str] = {}
  calls = []
  for line in strace_log.read_text(errors="replace").splitlines():
    pid, _, call = line.strip().partition(" ")  # "<pid> <call>", the pid padded with spaces.
    call = call.strip()
    if call.endswith("<unfinished ...>"):
      pending[pid] = call[:-len("<unfinished ...>")]
      continue
    resumed = re.match(r"<\.\.\. \w+ resumed>(.*)", call)
    if resumed:
      call = pending.pop(pid, "") + resumed.group(1)
    calls.append(call)
  changed = []
  for call in calls:
    name = call.split("(", 1)[0]
    result = re.search(r"\) += (-?\d+)", call)
    if str(workdir) not in call or result is None or int(result.group(1)) < 0:
      continue
    if name in ("open", "openat") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND",
                                                     call):
      continue
    changed.append(call)
  return changed


def _paths(call: str) -> list[str]:
  """The absolute paths in a traced call: quoted arguments, and `<path>` of fd arguments."""
  arguments = re.split(r"\) += -?\d+", call)[0]
  found = re.findall(r'"([^"]+)"|(?<!AT_FDCWD)<(/[^>]+)>', arguments)  # Not the cwd.
  return [path for pair in found for path in pair if path.startswith("/")]


def _own_shards_only(changes: list[str]) -> list[str]:
  """The changes that are not process 1's own checkpoint shards."""
  return [call for call in changes
          if not all(_OWN_SHARDS.search(path) for path in _paths(call))]


@dataclasses.dataclass(frozen=True)
class TrainSequence:
  """The killed-and-resumed two-process training runs (see the module docstring)."""
  workdir: Path
  launches: dict[str, Launch]
  exits: dict[str, tuple[int, float]]  # name -> (survivor's exit code, seconds after the kill).
  seconds: dict[str, float]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("multiprocess_logs")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, logs) -> TrainSequence:
  workdir = tmp_path_factory.mktemp("train_2p")
  strace = _strace()
  launches, exits, seconds = {}, {}, {}
  for name, step, victim in (("killed_1", 4, 1), ("killed_0", 8, 0)):
    began = time.monotonic()
    launch = launches[name] = Launch.start(name, workdir, logs, "configs/tiny.py", strace=strace)
    exits[name] = launch.kill_at_checkpoint(step, victim)
    seconds[name] = time.monotonic() - began
  began = time.monotonic()
  launch = launches["finished"] = Launch.start("finished", workdir, logs, "configs/tiny.py",
                                               strace=strace)
  launch.wait_ok()
  seconds["finished"] = time.monotonic() - began
  return TrainSequence(workdir, launches, exits, seconds)


@pytest.mark.slow
@pytest.mark.subprocess
def test_killed_process_stops_its_peer_at_once_with_one_line(killed_and_resumed):
  """SIGKILL of process 1: process 0 stops with one line naming process 1 (exit 1)."""
  code, seconds = killed_and_resumed.exits["killed_1"]
  log = killed_and_resumed.launches["killed_1"].log(0)
  assert code == 1, log[-3000:]
  assert seconds < SURVIVOR_TIMEOUT
  lines = _user_lines(log)
  assert len(lines) == 1, log[-3000:]
  assert re.match(r"error: lost contact with process 1 of 2 \(host .+, pid \d+\): .+; rerun "
                  r"every process with the same command to resume", lines[0]), lines[0]
  assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.subprocess
def test_killed_coordinator_stops_the_other_process(killed_and_resumed):
  """SIGKILL of process 0 (the coordinator): process 1 stops at once, non-zero, with a message
  naming the lost coordinator: ours, or JAX's runtime's when its error poller comes first."""
  code, seconds = killed_and_resumed.exits["killed_0"]
  log = killed_and_resumed.launches["killed_0"].log(1)
  assert code != 0 and seconds < SURVIVOR_TIMEOUT, log[-3000:]
  ours = [line for line in _user_lines(log) if "lost contact with process 0 of 2" in line]
  jax_runtime = re.search(r"Terminating process because the JAX distributed service detected "
                          r"fatal errors.*(leader task|coordination service)", log)
  assert ours or jax_runtime, log[-3000:]
  if ours:
    assert "the coordinator at 127.0.0.1:" in ours[0]


@pytest.mark.slow
@pytest.mark.subprocess
def test_rerun_of_both_processes_resumes_from_the_last_checkpoint(killed_and_resumed):
  launches = killed_and_resumed.launches
  assert "Resuming from checkpoint at step 4." in launches["killed_0"].log(0)
  results = json.loads((killed_and_resumed.workdir / "results.json").read_text())
  assert results["resumed_from_step"] == 8 and results["steps"] == 16
  assert results["devices"] == 2


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_training_equals_one_process(killed_and_resumed, tiny_baseline):
  """The killed, resumed two-process run ends where one uninterrupted process does."""
  two = json.loads((killed_and_resumed.workdir / "results.json").read_text())
  one = tiny_baseline.results
  for split in ("train", "val", "test"):
    assert two[f"{split}_accuracy"] == pytest.approx(one[f"{split}_accuracy"], abs=1e-9), split
    assert two[f"{split}_loss"] == pytest.approx(one[f"{split}_loss"], rel=1e-4), split
    assert two[f"{split}_examples"] == one[f"{split}_examples"]
  # The logged trajectory too: every logged step's loss, in both runs.
  def losses(workdir: Path) -> dict[tuple[int, str], float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], key): r[key] for r in records for key in r
            if key.endswith("loss") and isinstance(r[key], float)}
  one_losses, two_losses = losses(tiny_baseline.workdir), losses(killed_and_resumed.workdir)
  assert set(two_losses) == set(one_losses)
  for key, value in one_losses.items():
    assert two_losses[key] == pytest.approx(value, rel=1e-4), key


@pytest.mark.slow
@pytest.mark.subprocess
def test_checkpoints_are_written_once_and_read_by_one_process(killed_and_resumed, tiny_baseline):
  directory = killed_and_resumed.workdir / checkpointing.CHECKPOINT_DIR
  assert sorted(p.name for p in directory.iterdir()) == ["12", "16"]  # max_checkpoints=2.
  for step in ("12", "16"):
    assert (directory / step / checkpointing.INTEGRITY_FILE).exists()
    assert checkpointing.integrity_problem(directory / step) is None
  assert not (killed_and_resumed.workdir / checkpointing.CORRUPT_DIR).exists()
  # Saved by two processes, loaded by one (this test process) into the same model.
  variables, meta = checkpointing.load_checkpoint(killed_and_resumed.workdir)
  reference, reference_meta = checkpointing.load_checkpoint(tiny_baseline.workdir)
  assert meta == reference_meta
  import jax
  import numpy as np
  for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)
  # The workdir holds what a one-process run's holds.
  assert ({p.name for p in killed_and_resumed.workdir.iterdir()}
          == {p.name for p in tiny_baseline.workdir.iterdir()})


@pytest.fixture(scope="module")
def robustness_runs(tiny_baseline, tmp_path_factory, logs):
  """The same robustness run of the session's tiny checkpoint by one and by two processes."""
  one_dir, two_dir = (tmp_path_factory.mktemp(name) for name in ("robust_1p", "robust_2p"))
  launch = Launch.start("robustness", two_dir, logs, "configs/robustness.py",
                        f"--config.robustness.checkpoint={tiny_baseline.workdir}",
                        *(_flag(key, value) for key, value in ROBUSTNESS.items()),
                        strace=_strace())
  config = robustness_config.get_config()
  config.robustness.checkpoint = str(tiny_baseline.workdir)
  one = launch.meanwhile(robustness.run_robustness, override(config, **ROBUSTNESS), one_dir)
  launch.wait_ok()
  return one, json.loads((two_dir / "results.json").read_text()), launch


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_robustness_equals_one_process(robustness_runs):
  one, two, _ = robustness_runs
  assert two["num_examples"] == one["num_examples"] == 64
  assert two["clean_accuracy"] == pytest.approx(one["clean_accuracy"], abs=1e-9)
  for field in ("robust_accuracy", "worst_case_accuracy"):
    assert _flat(two[field]) == pytest.approx(_flat(one[field]), abs=1e-9), field
  for got, expected in zip(two["records"], one["records"]):
    assert (got["attack"], got["eps"]) == (expected["attack"], expected["eps"])
    assert got["robust_accuracy"] == pytest.approx(expected["robust_accuracy"], abs=1e-9)
    assert got["mean_steps"] == pytest.approx(expected["mean_steps"], abs=1e-9)
    if expected["mean_perturbation_norm"] is not None:
      assert got["mean_perturbation_norm"] == pytest.approx(expected["mean_perturbation_norm"],
                                                            rel=1e-4)


@pytest.fixture(scope="module")
def adcorda_runs(tmp_path_factory, logs):
  """The same small AdCorDA run (configs/adcorda_digits.py, one seed) by one and two processes."""
  one_dir, two_dir = (tmp_path_factory.mktemp(name) for name in ("adcorda_1p", "adcorda_2p"))
  launch = Launch.start("adcorda", two_dir, logs, "configs/default.py",
                        *(_flag(key, value) for key, value in ADCORDA.items()),
                        strace=_strace())
  one = launch.meanwhile(adcorda.run_adcorda, override(adcorda_digits.get_config(), **ADCORDA),
                         one_dir)
  launch.wait_ok()
  return one, json.loads((two_dir / "results.json").read_text()), launch


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_adcorda_equals_one_process(adcorda_runs):
  one, two, _ = adcorda_runs
  assert two["correction"]["misclassified"] == one["correction"]["misclassified"] > 0
  for key in ("corrected", "failed"):
    assert two["correction"][key] == one["correction"][key], key
  assert set(two["variants"]) == set(one["variants"]) == set(adcorda.VARIANTS)
  for name, expected in one["variants"].items():
    got = two["variants"][name]
    for key in ("test_accuracy", "train_accuracy", "val_accuracy"):
      assert got[key] == pytest.approx(expected[key], abs=1e-9), (name, key)
    assert _flat(got["robust_accuracy"]) == pytest.approx(_flat(expected["robust_accuracy"]),
                                                          abs=1e-9), name


@pytest.mark.slow
@pytest.mark.subprocess
def test_only_process_0_writes_into_the_workdir(killed_and_resumed, robustness_runs,
                                                adcorda_runs):
  """Process 1 reads the workdir and writes only its own shards of orbax checkpoints."""
  launches = [*killed_and_resumed.launches.values(), robustness_runs[2], adcorda_runs[2]]
  if launches[0].strace_log is None:
    pytest.skip("strace cannot trace processes here")
  shards = 0
  for launch in launches:
    changes = _writes(launch.strace_log, launch.workdir)
    assert _own_shards_only(changes) == [], (launch.name, _own_shards_only(changes)[:5])
    shards += len(changes)
  assert shards > 0  # Its checkpoint shards were seen: the trace works.


@pytest.mark.slow
@pytest.mark.subprocess
def test_only_process_0_reports(killed_and_resumed, robustness_runs, adcorda_runs):
  """One progress report and one summary per run: process 1 logs warnings and errors only."""
  for launch in (killed_and_resumed.launches["finished"], robustness_runs[2], adcorda_runs[2]):
    first, second = launch.log(0), launch.log(1)
    assert "Done:" in first and "Done:" not in second, launch.name
    progress = re.compile(r"\d+/\d+ \(\d+%\)")  # Progress lines: "train: 4/16 (25%), ..."
    assert progress.search(first) and not progress.search(second), launch.name
