"""Failure paths of issue #14: each test reproduces one defect and fails without its fix.

Interrupts, full disks and crashes are injected with `ADCORDA_FAULTS` (`adcorda_jax.faults`), so
they happen at a chosen step or write instead of by timing luck.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.training import train_state
from PIL import Image

from adcorda_jax import faults, interrupts, tasks, workdir as workdir_lib
from adcorda_jax.data import idx, image_folder, tfds_source
from adcorda_jax.errors import CheckpointError, ConfigError, DataError, TrainingError
from adcorda_jax.training import checkpointing, resumable, trainer
from adcorda_jax.pipeline import run as pipeline_run
from configs import tiny
from tests.helpers import one_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_fault_counts():
  faults.reset()
  yield
  faults.reset()


def _main(*args: str, faults_plan: str = "") -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(faults.ENV, None)
  if faults_plan:
    env[faults.ENV] = faults_plan
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env)


def _user_lines(stderr: str) -> list[str]:
  """stderr without absl's log records (I/W/E + date prefixes) and progress lines."""
  return [line for line in stderr.splitlines()
          if line.strip() and not (line[:1] in "IWE" and line[1:5].isdigit())]


@pytest.fixture
def trained(tiny_baseline) -> tuple[Path, dict]:
  """The session's finished tiny training run (tests/conftest.py): read-only; tests that write
  into a run take `tiny_baseline.copy_to(...)`."""
  return tiny_baseline.workdir, tiny_baseline.results


# --- 1. Image modes. ---------------------------------------------------------------------------

def _save(path: Path, image: Image.Image, **kwargs) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)
  return path


def test_16_bit_images_keep_their_range(tmp_path):
  ramp = np.linspace(0, 65535, 4096).reshape(64, 64)
  for name, scale in (("full", 1.0), ("half", 0.5)):
    for index in range(3):
      _save(tmp_path / name / f"{index}.png", Image.fromarray((ramp * scale).astype(np.uint16)))
  assert Image.open(tmp_path / "full" / "0.png").mode.startswith("I")
  config = ml_collections.ConfigDict({"name": "image_folder", "data_dir": str(tmp_path),
                                      "grayscale": True, "image_size": 16})
  train, _, names = image_folder.load_image_folder(config)
  assert names == ("full", "half")
  full, half = train.images[train.labels == 0], train.images[train.labels == 1]
  assert full.max() > 0.95 and full.min() < 0.05  # Not clipped to 1.0 as convert('L') did.
  np.testing.assert_allclose(full.mean(), 0.5, atol=0.01)
  np.testing.assert_allclose(half.mean(), 0.25, atol=0.01)
  rgb = image_folder.read_image(tmp_path / "half" / "0.png", 16, grayscale=False)
  assert rgb.shape == (16, 16, 3) and np.allclose(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGB", "RGBA", "CMYK"])
def test_eight_bit_modes_match_pil_conversion(tmp_path, mode):
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
  image = rgb.convert(mode)
  path = _save(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}", image)
  for grayscale in (True, False):
    pixels = image_folder.read_image(path, 8, grayscale)
    with Image.open(path) as opened:
      expected = np.asarray(opened.convert("L" if grayscale else "RGB").resize(
          (8, 8), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_array_equal(pixels.reshape(expected.shape), expected)
    assert pixels.shape == (8, 8, 1 if grayscale else 3)


def test_float_images_in_range_are_read_and_out_of_range_refused(tmp_path):
  good = _save(tmp_path / "good.tiff", Image.fromarray(np.full((8, 8), 0.25, np.float32), "F"))
  np.testing.assert_allclose(image_folder.read_image(good, 4, True), 0.25, atol=1e-6)
  bad = _save(tmp_path / "bad.tiff", Image.fromarray(np.full((8, 8), 300.0, np.float32), "F"))
  with pytest.raises(DataError) as error:
    image_folder.read_image(bad, 4, True)
  assert str(bad) in one_line(error) and "outside [0, 1]" in str(error.value)


def test_32_bit_integers_beyond_16_bits_are_refused(tmp_path):
  path = _save(tmp_path / "wide.tiff", Image.fromarray(np.full((8, 8), 1 << 20, np.int32), "I"))
  with pytest.raises(DataError) as error:
    image_folder.read_image(path, 4, True)
  assert str(path) in one_line(error)


def test_exif_orientation_is_applied(tmp_path):
  pixels = np.zeros((4, 8, 3), np.uint8)
  pixels[:, :4] = 255  # Left half white, landscape.
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  path = _save(tmp_path / "rotated.png", Image.fromarray(pixels), exif=exif)
  upright = image_folder.read_image(path, 8, grayscale=True)[..., 0]
  assert upright[:4].mean() > 0.9 and upright[4:].mean() < 0.1  # Top half white after rotation.


def test_unreadable_image_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "broken.png"
  path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(DataError) as error:
    image_folder.read_image(path, 8, True)
  assert str(path) in one_line(error)


# --- 2. Claiming a workdir only when work starts. -------------------------------------------------

@pytest.mark.slow
def test_failed_validation_does_not_claim_the_workdir(tmp_path):
  bad = tiny.get_config()
  bad.train.learning_rate = -0.1
  with pytest.raises(ConfigError):
    tasks.run_task(bad, tmp_path)
  assert not (tmp_path / workdir_lib.CONFIG_FILE).exists()
  good = tiny.get_config()
  good.train.learning_rate = 0.05
  assert tasks.run_task(good, tmp_path)["status"] == "complete"


@pytest.mark.slow
def test_robustness_with_a_bad_checkpoint_then_the_right_one(trained, tmp_path):
  from configs import robustness
  config = robustness.get_config()
  config.robustness.checkpoint = str(trained[0] / "results.json")  # A file: defect 7.
  with pytest.raises(CheckpointError) as error:
    tasks.run_task(config, tmp_path)
  assert "is a file" in one_line(error)
  config.robustness.checkpoint = str(trained[0])
  config.robustness.max_examples = 32
  config.robustness.eps = (0.05,)
  config.robustness.attacks = "fgsm"
  assert tasks.run_task(config, tmp_path)["status"] == "complete"


@pytest.mark.slow
def test_a_claim_without_work_is_reclaimed_but_work_is_protected(tmp_path):
  other = tiny.get_config()
  other.train.learning_rate = 0.3
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(workdir_lib.config_to_dict(other)))
  assert tasks.run_task(tiny.get_config(), tmp_path)["status"] == "complete"
  with pytest.raises(ConfigError) as error:
    tasks.run_task(other, tmp_path)
  assert "train.learning_rate" in one_line(error)


# --- 3. Lock and permissions. -------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_on_a_locked_workdir_is_refused_naming_the_pid(tmp_path):
  with pipeline_run.locked(workdir_lib.prepare(tmp_path)):
    with pytest.raises(CheckpointError) as error:
      tasks.run_task(tiny.get_config(), tmp_path)
  assert f"in use by another run (pid {os.getpid()})" in one_line(error)
  assert not (tmp_path / "metrics.jsonl").exists()
  assert tasks.run_task(tiny.get_config(), tmp_path)["status"] == "complete"  # Released.


@pytest.mark.slow
@pytest.mark.subprocess
def test_lock_is_released_when_the_holder_is_killed(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from pathlib import Path; "
       "from adcorda_jax.pipeline import run; "
       f"ctx = run.locked(Path({str(tmp_path)!r})); ctx.__enter__(); "
       "print('locked', flush=True); time.sleep(60)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(CheckpointError) as error:
    with pipeline_run.locked(tmp_path):
      pass
  assert f"pid {holder.pid}" in one_line(error)
  holder.kill()
  holder.wait()
  with pipeline_run.locked(tmp_path):  # kill -9 released it.
    pass


@pytest.mark.slow
def test_artifacts_honour_the_umask(tmp_path):
  previous = os.umask(0o027)
  try:
    tasks.run_task(tiny.get_config(), tmp_path)
  finally:
    os.umask(previous)
  for name in ("config.json", "results.json", "report.md", "training_curves.png"):
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


# --- 4. Interrupts. -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("plan, signum, extra", [
    ("train_step@5=sigterm", signal.SIGTERM, ()),
    # Delivered while checkpoint 2 is being written: the write finishes first.
    ("checkpoint_write@2=sigint", signal.SIGINT, ("--config.train.checkpoint_every_steps=1",)),
])
def test_signal_saves_once_prints_one_line_and_resumes_exactly(trained, tmp_path, plan, signum,
                                                               extra):
  args = ("--config", "configs/tiny.py", "--workdir", str(tmp_path), *extra)
  out = _main(*args, faults_plan=plan)
  assert out.returncode == 128 + signum, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  lines = _user_lines(out.stderr)
  assert len(lines) == 1, lines
  name = signal.Signals(signum).name
  assert lines[0].startswith(f"interrupted by {name}: step ") and "is saved in" in lines[0]
  step = int(lines[0].split("step ")[1].split()[0])
  assert step == (5 if signum == signal.SIGTERM else 2)
  checkpointing.load_checkpoint(tmp_path / "checkpoints" / str(step))  # Complete and readable.
  again = _main(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = json.loads((tmp_path / "results.json").read_text())
  assert resumed["resumed_from_step"] == step
  for key in ("test_accuracy", "test_loss", "train_loss"):
    assert resumed[key] == trained[1][key], key


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_in_an_attack_run_keeps_finished_batches(trained, tmp_path):
  args = ("--config", "configs/robustness.py", "--workdir", str(tmp_path),
          f"--config.robustness.checkpoint={trained[0]}", "--config.robustness.attacks=pgd",
          "--config.robustness.eps=(0.05,)", "--config.robustness.max_examples=96",
          "--config.robustness.batch_size=32", "--config.robustness.pgd.steps=3")
  out = _main(*args, faults_plan="attack_batch@2=sigterm")
  assert out.returncode == 143 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert _user_lines(out.stderr) == [
      "interrupted by SIGTERM; work finished so far is kept; rerun the same command to resume"]
  again = _main(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  record = json.loads((tmp_path / "results.json").read_text())["records"][0]
  assert record["resumed_batches"] == 2


@pytest.mark.slow
@pytest.mark.subprocess
def test_kill_9_mid_training_resumes_bitwise(trained, tmp_path):
  args = ("--config", "configs/tiny.py", "--workdir", str(tmp_path))
  assert _main(*args, faults_plan="train_step@6=crash").returncode == 137
  assert checkpointing.checkpoint_step(tmp_path) == 4
  again = _main(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = json.loads((tmp_path / "results.json").read_text())
  assert resumed["resumed_from_step"] == 4
  for key in ("test_accuracy", "test_loss", "train_loss", "val_loss"):
    assert resumed[key] == trained[1][key], key


def _tiny_loop_state() -> train_state.TrainState:
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  apply = lambda p, x: x @ p["w"] + p["b"]
  return train_state.TrainState.create(apply_fn=apply, params=params, tx=optax.sgd(0.1))


def _loop_step(state, step_index):
  x = jax.random.normal(jax.random.key(step_index), (8, 3))

  def loss(params):
    return jnp.mean((state.apply_fn(params, x) - 1.0) ** 2)

  value, grads = jax.value_and_grad(loss)(state.params)
  state = state.apply_gradients(grads=grads)
  finite = jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(
      state.params)]))
  return state, {"loss": value, "params_finite": finite.astype(jnp.float32)}


def _run_loop(directory: Path, total: int = 12):
  loop = resumable.LoopSettings(total_steps=total, steps_per_epoch=4, log_every_steps=4,
                                checkpoint_every_steps=4, max_checkpoints=2,
                                divergence_hint="adapt.learning_rate")
  return resumable.run_resumable(_tiny_loop_state(), jax.jit(_loop_step, static_argnums=1),
                                 loop=loop, directory=directory, meta={}, description="t",
                                 what="fine-tuning")


@pytest.mark.slow
def test_shared_loop_saves_on_sigterm_for_fine_tuning_and_distillation(tmp_path, monkeypatch):
  reference = _run_loop(tmp_path / "reference").state
  monkeypatch.setenv(faults.ENV, "train_step@6=sigterm")
  with pytest.raises(interrupts.Interrupted) as stopped:
    with interrupts.graceful_signals():
      _run_loop(tmp_path / "run")
  assert stopped.value.exit_code == 143 and "step 6 is saved" in stopped.value.saved
  monkeypatch.delenv(faults.ENV)
  resumed = _run_loop(tmp_path / "run")
  assert resumed.resumed_from_step == 6
  equal = jax.tree.map(np.array_equal, resumed.state.params, reference.params)
  assert all(jax.tree.leaves(equal))


# --- 5. Corrupt latest checkpoint. --------------------------------------------------------------

@pytest.mark.slow
def test_every_step_of_a_run_passes_its_integrity_record(trained):
  steps = sorted((trained[0] / "checkpoints").iterdir())
  assert steps and all(checkpointing.integrity_problem(step) is None for step in steps
                       if step.name.isdigit())


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_and_is_kept_aside(trained, tiny_baseline, tmp_path,
                                                              caplog):
  workdir = tiny_baseline.copy_to(tmp_path / "run")
  (workdir / "results.json").unlink()
  data_file = next(p for p in (workdir / "checkpoints" / "16" / "state").rglob("*")
                   if p.is_file() and p.parent.name == "d")
  data_file.write_bytes(data_file.read_bytes()[:100])
  with pytest.raises(CheckpointError) as error:  # Loading that step by name is refused cleanly.
    checkpointing.load_checkpoint(workdir / "checkpoints" / "16")
  assert "has 100 bytes" in one_line(error) and "pybind" not in str(error.value)
  resumed = trainer.train_and_evaluate(tiny.get_config(), workdir)
  assert resumed["resumed_from_step"] == 12
  assert resumed["test_accuracy"] == trained[1]["test_accuracy"]
  assert (workdir / "corrupt_checkpoints" / "16" / "state").is_dir()  # Kept, not deleted.
  assert any("Skipped checkpoint step 16" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_unreadable_integrity_record_counts_as_damage(tiny_baseline, tmp_path):
  step = tiny_baseline.copy_to(tmp_path / "run") / "checkpoints" / "16"
  assert checkpointing.integrity_problem(step) is None
  (step / checkpointing.INTEGRITY_FILE).write_text("{truncated")
  assert "unreadable" in checkpointing.integrity_problem(step)


# --- 6. Disk full. ------------------------------------------------------------------------------

@pytest.mark.slow
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last(tmp_path, monkeypatch):
  monkeypatch.setenv(faults.ENV, "checkpoint_write@2=enospc")
  with pytest.raises(CheckpointError) as error:
    trainer.train_and_evaluate(tiny.get_config(), tmp_path)
  message = one_line(error)
  assert message.startswith(f"no space left on device writing '{tmp_path / 'checkpoints'}/8'")
  assert "the last good checkpoint (step 4) is kept" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
  monkeypatch.delenv(faults.ENV)
  assert trainer.train_and_evaluate(tiny.get_config(), tmp_path)["resumed_from_step"] == 4


@pytest.mark.slow
def test_too_little_space_is_refused_before_orbax_writes(tmp_path, monkeypatch):
  real = checkpointing.shutil.disk_usage
  monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                      lambda path: real(path)._replace(free=1000))
  with pytest.raises(CheckpointError) as error:
    trainer.train_and_evaluate(tiny.get_config(), tmp_path)
  assert "MiB needed" in one_line(error) and "no earlier checkpoint exists" in str(error.value)


def test_disk_full_writing_an_artifact_names_it(tmp_path, monkeypatch):
  monkeypatch.setenv(faults.ENV, "artifact_write@1=enospc")
  with pytest.raises(CheckpointError) as error:
    workdir_lib.write_json_atomic(tmp_path / "results.json", {"a": 1})
  assert one_line(error).startswith(f"no space left on device writing '{tmp_path}/results.json'")
  assert list(tmp_path.iterdir()) == []  # No temporary file left behind.


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_disk_full_is_one_line(tmp_path):
  out = _main("--config", "configs/tiny.py", "--workdir", str(tmp_path),
              faults_plan="checkpoint_write@1=enospc")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  lines = _user_lines(out.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), lines


# --- 7. One line instead of a traceback. ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("args, expected", [
    (("--config", "configs/nonexistent.py"),
     "error: --config configs/nonexistent.py: no such file"),
    (("--config", "configs/tiny.py", "--config.train.epochz=3"),
     "error: --config.train.epochz: the config has no field 'epochz'; "
     'did you mean "epochs" instead of "epochz"?'),
])
def test_cli_flag_errors_are_one_line(tmp_path, args, expected):
  out = _main(*args, "--workdir", str(tmp_path))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert _user_lines(out.stderr) == [expected]


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_config_file_with_a_syntax_error_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  out = _main("--config", str(broken), "--workdir", str(tmp_path / "run"))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  lines = _user_lines(out.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"error: --config {broken}: "), lines


@pytest.mark.slow
def test_baseline_checkpoint_that_is_a_file(trained, tmp_path):
  from configs import adcorda_digits
  config = adcorda_digits.get_config()
  config.adcorda.baseline_checkpoint = str(trained[0] / "results.json")
  with pytest.raises(CheckpointError) as error:
    tasks.run_task(config, tmp_path)
  assert "is a file" in one_line(error)


# --- 8. baseline_checkpoint and config.data. ------------------------------------------------------

@pytest.mark.slow
def test_baseline_checkpoint_refuses_config_data_that_disagrees(trained, tmp_path):
  from configs import adcorda_digits
  config = adcorda_digits.get_config()
  config.adcorda.baseline_checkpoint = str(trained[0])
  config.data = tiny.get_config().data
  config.data.max_train_examples = 128
  with pytest.raises(ConfigError) as error:
    tasks.run_task(config, tmp_path)
  message = one_line(error)
  assert "adcorda.baseline_checkpoint=" in message
  assert "data.max_train_examples: 256 vs 128" in message


# --- 9. Smaller ones. ---------------------------------------------------------------------------

@pytest.mark.slow
def test_divergence_names_the_first_non_finite_step(tmp_path):
  config = tiny.get_config()
  config.train.learning_rate = 1e6
  config.train.log_every_steps = 8
  config.train.checkpoint_every_steps = 0
  first_bad = []

  def watch(step, state):
    finite = all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(state.params))
    if not finite and not first_bad:
      first_bad.append(step)

  with pytest.raises(TrainingError) as error:
    trainer.train_and_evaluate(config, tmp_path, step_callback=watch)
  assert first_bad and first_bad[0] % 8 != 0  # Else this test could not tell the two apart.
  assert f"diverged at step {first_bad[0]} " in one_line(error)


def test_fashion_mnist_folder_without_files_gets_the_install_hint(tmp_path):
  with pytest.raises(DataError) as error:
    idx.load_fashion_mnist(ml_collections.ConfigDict({"data_dir": str(tmp_path)}))
  assert "apt-get install dataset-fashion-mnist" in one_line(error)


def test_tfds_without_network_fails_fast_with_a_hint(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "network_available", lambda *a, **k: False)
  config = ml_collections.ConfigDict({"tfds_data_dir": str(tmp_path), "tfds_download": True})
  with pytest.raises(DataError) as error:
    tfds_source.load_tfds("mnist", config)
  assert "no network" in one_line(error) and "data.tfds_download=False" in str(error.value)


@pytest.mark.slow
def test_finished_run_with_a_cadence_change_keeps_config_matching_results(trained, tiny_baseline,
                                                                        tmp_path):
  workdir, results = tiny_baseline.copy_to(tmp_path / "run"), trained[1]  # run_task locks it.
  config = tiny.get_config()
  config.train.log_every_steps = 3  # A resumable key: the finished run is returned as it is.
  assert tasks.run_task(config, workdir) == json.loads(json.dumps(results))
  saved = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  assert saved == json.loads((workdir / "results.json").read_text())["config"]


@pytest.mark.slow
def test_loaded_checkpoint_logs_its_step(trained, caplog):
  caplog.set_level("INFO")
  checkpointing.load_checkpoint(trained[0])
  assert any("(step 16)" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_raising_train_epochs_continues_a_finished_run(tiny_baseline, tmp_path):
  workdir = tiny_baseline.copy_to(tmp_path / "run")
  longer = tiny.get_config()
  longer.train.epochs = 3
  calls = []
  results = trainer.train_and_evaluate(longer, workdir, step_callback=lambda s, _: calls.append(s))
  assert calls == list(range(17, 25))
  assert results["resumed_from_step"] == 16 and results["steps"] == 24
  assert results["extended_from"] == {"train.epochs": 2}
  with pytest.raises(ConfigError) as error:  # Shrinking is a different run.
    trainer.train_and_evaluate(tiny.get_config(), workdir)
  assert "train.epochs may only grow" in one_line(error)
