"""Command-line entry point: `python main.py --config configs/<experiment>.py --workdir <dir>`.

Any config field can be overridden, e.g. `--config.train.epochs=3`. All logic lives in
`adcorda_jax`; this file parses flags, sets up (multi-host) JAX, and runs `config.task`. Every
failure a user can cause ends in one line on stderr and a non-zero exit: 1 for errors, 2 for bad
flags, 130 / 143 after SIGINT / SIGTERM (the run saves first; rerun the same command to resume).
A process of a multi-process run that fails exits at once, so its peers stop too (see
`adcorda_jax.distributed`).
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from adcorda_jax import cli_errors, distributed, interrupts, log_filters, runtime, tasks
from adcorda_jax.errors import AdcordaError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/default.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad config file or override reported in one line."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get("task")  # The config file loads lazily: a failure surfaces on first use.
  except Exception as e:  # absl, ml_collections and the config file itself raise many types.
    print(f"error: {cli_errors.flag_error_line(e, argv)}", file=sys.stderr)
    sys.exit(2)
  return remaining


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  log_filters.quiet_library_logs()
  config = FLAGS.config
  try:
    with interrupts.graceful_signals():
      runtime.setup_jax(config)
      tasks.run_task(config, FLAGS.workdir)
  except AdcordaError as e:
    distributed.exit_with(f"error: {distributed.lost_peer_line(e) or e}")
  except interrupts.Interrupted as e:
    saved = f": {e.saved}" if e.saved else "; work finished so far is kept"
    print(f"interrupted by {e}{saved}; rerun the same command to resume", file=sys.stderr)
    interrupts.exit_now(e.exit_code)
  except Exception as e:  # A full disk (or a lost peer) can surface anywhere, wrapped.
    line = distributed.lost_peer_line(e) or cli_errors.disk_full_line(e)
    if line is None:
      distributed.exit_with_traceback()  # Only in a multi-process run: its peers must not wait.
      raise
    distributed.exit_with(f"error: {line}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
