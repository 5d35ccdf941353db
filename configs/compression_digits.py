"""The compression study (arXiv 2401.12014) on scikit-learn's digits: tiny, offline, a few minutes.

    python main.py --config configs/compression_digits.py --workdir runs/study_digits

Two networks (small CNN at width 1 and 0.5), each compressed by L1 filter pruning, magnitude
pruning, distillation into a half-width student and 8/4-bit PTQ, then evaluated clean, under every
grey-scale corruption at severities 1-5, and under PGD. Every other study config imports this one.
"""
import ml_collections

from configs import adcorda_digits


def get_config() -> ml_collections.ConfigDict:
  config = adcorda_digits.get_config()   # Its `adapt` (fine-tuning) and `evaluate` sections.
  config.task = "compression_study"
  del config.adcorda, config.correct
  config.model.width = 1.0
  config.train.epochs = 10               # Each original network.

  study = config.study = ml_collections.ConfigDict()
  study.networks = ("small_cnn:1.0", "small_cnn:0.5")  # model.name:width, the larger first.
  study.methods = "filter_pruning,magnitude_pruning,distillation,ptq"
  study.rates = ml_collections.ConfigDict()
  study.rates.filter_pruning = (0.5, 0.75)     # Fraction of each prunable layer's filters removed.
  study.rates.magnitude_pruning = (0.5, 0.9)   # Fraction of all kernel weights zeroed.
  study.rates.distillation = (0.5,)            # Student width / teacher width.
  study.rates.ptq = (8, 4)                     # Weight bits (per-channel, model.quant grid).
  study.magnitude_scope = "global"             # global or layer.
  study.magnitude_schedule = "one_shot"        # one_shot, or gradual (polynomial, Zhu & Gupta).
  study.seeds = (0,)                           # Fine-tuning / distillation seeds per cell.
  study.plot_corruptions = True                # corruptions.png: every corruption x severity.

  config.adapt.epochs = 3                      # Fine-tuning after pruning.
  config.adapt.learning_rate = 0.01

  distill = config.distill = ml_collections.ConfigDict()
  distill.epochs = 10                          # The student trains from scratch.
  distill.batch_size = 64
  distill.optimizer = "sgd"
  distill.learning_rate = 0.05
  distill.momentum = 0.9
  distill.nesterov = True
  distill.weight_decay = 5e-4
  distill.schedule = "cosine"
  distill.warmup_epochs = 1.0
  distill.alpha = 0.9                          # Weight of the soft-target KL term.
  distill.temperature = 4.0
  distill.beta = 0.0                           # > 0 adds a FitNets hint on penultimate features.
  distill.log_every_steps = 50
  distill.max_checkpoints = 1

  shift = config.shift = ml_collections.ConfigDict()
  shift.corruptions = "all"                    # Or a comma-separated subset (adcorda_jax.shift).
  shift.severities = (1, 2, 3, 4, 5)
  shift.max_examples = 0                       # Corrupt the first N test images; 0 = all.
  shift.batch_size = 500
  shift.domains = ml_collections.ConfigDict()  # name -> data config with the same classes.

  config.evaluate.attacks = "pgd"
  config.evaluate.eps = (0.02, 0.05)
  return config
