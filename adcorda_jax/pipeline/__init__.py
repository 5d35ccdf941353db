"""The layer between tasks: runs, their stages, and the fingerprints that decide what resumes.

* `open_run` / `Run` (`pipeline.run`): a locked workdir, claimed late, finished once, with one
  results envelope.
* `Stage` (`pipeline.stage`): a fingerprinted sub-folder with `done()` / `finish()`.
* `fingerprint`: flat fingerprints, their differences, the one mismatch message, digests.
"""
from adcorda_jax.pipeline import fingerprint
from adcorda_jax.pipeline.run import FORMAT_VERSION, Run, finished_results, open_run
from adcorda_jax.pipeline.stage import Stage

__all__ = ["FORMAT_VERSION", "Run", "Stage", "finished_results", "fingerprint", "open_run"]
