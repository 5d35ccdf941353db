"""Command-line entry point: `python main.py --config configs/<experiment>.py --workdir <dir>`.

Any config field can be overridden, e.g. `--config.train.epochs=3`. All logic lives in
`adcorda_jax`; this file parses flags, sets up (multi-host) JAX, and runs `config.task`.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adcorda_jax import log_filters, runtime, tasks
from adcorda_jax.errors import AdcordaError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/default.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  log_filters.quiet_library_logs()
  config = FLAGS.config
  try:
    runtime.setup_jax(config)
    tasks.run_task(config, FLAGS.workdir)
  except AdcordaError as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
