"""Correction success on the misclassified training images of a trained checkpoint, per eps.

    python benchmarks/correction_rates.py --checkpoint runs/fashion_mnist --out corr.json

AdCorDA's stage 1 asks: for how many training images the model gets wrong does a targeted
descent toward the TRUE label, inside an L-inf ball of radius eps, make the model right? Only the
misclassified images are attacked (`correct` leaves the others untouched anyway).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from absl import app, flags, logging

from adcorda_jax.attacks import AttackSpec, attack_model, attack_split
from adcorda_jax.data import load_dataset
from adcorda_jax.training.provenance import training_data
from adcorda_jax.training import checkpointing, sharding

flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ or a step folder).")
flags.DEFINE_list("eps255", ["2", "4", "8"], "L-inf budgets in units of 1/255.")
flags.DEFINE_integer("steps", 20, "Correction steps (step = 2.5 * eps / steps).")
flags.DEFINE_integer("batch_size", 500, "Global batch.")
flags.DEFINE_string("out", "correction_rates.json", "Where to write the records.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  path = Path(FLAGS.checkpoint)
  variables, meta = checkpointing.load_checkpoint(path)
  model = checkpointing.model_from_meta(meta)
  data_config, seed, _ = training_data(path, meta, "")
  train = load_dataset(data_config, seed).train
  logits_fn, params = attack_model(model, variables)
  mesh = sharding.make_mesh()
  spec = AttackSpec("correct", steps=FLAGS.steps, random_start=False)
  # A clean pass over the whole training split finds the misclassified images (eps = 0).
  clean = attack_split(spec, logits_fn, params, train.images, train.labels, eps=0.0,
                       batch_size=FLAGS.batch_size, key=jax.random.key(0), mesh=mesh,
                       description="clean pass")
  wrong = ~clean.clean_correct
  records = []
  for eps255 in FLAGS.eps255:
    eps = float(eps255) / 255
    start = time.perf_counter()
    result = attack_split(spec, logits_fn, params, train.images[wrong], train.labels[wrong],
                          eps=eps, batch_size=FLAGS.batch_size, key=jax.random.key(0),
                          mesh=mesh, description=f"correct eps={eps255}/255")
    records.append({
        "eps": eps, "eps_label": f"{eps255}/255", "train_examples": len(train.labels),
        "misclassified": int(wrong.sum()), "corrected": int(result.success.sum()),
        "success_rate": float(result.success.mean()),
        "mean_linf": float(result.perturbation_norm[result.success].mean()),
        "mean_steps": float(result.steps_used[result.success].mean()),
        "steps": FLAGS.steps, "seconds": time.perf_counter() - start})
    logging.info("%s", records[-1])
  Path(FLAGS.out).write_text(json.dumps(records, indent=2))
  print(json.dumps(records, indent=2))


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  app.run(main)
