"""Robustness of a trained checkpoint: clean and robust accuracy under PGD and APGD-CE per eps.

    python main.py --config configs/train_digits.py --workdir runs/train_digits  # train first
    python main.py --config configs/robustness.py --workdir runs/robustness \
        --config.robustness.checkpoint=runs/train_digits

The checkpoint may be a training workdir, its `checkpoints/` folder or one step folder. The data
(dataset, split fractions, seed) is taken from that training run's config.json, so the evaluated
split is the one the model never trained on. Measured: ~18 s wall on 2 (shared) CPU cores for all
359 digits test images against a configs/tiny.py checkpoint; configs/train_digits.py's (wider) model is
unmeasured. Results: results.json, report.md, robustness.png and per-example arrays under
attacks/<attack>_<norm>_eps<eps>/arrays.npz.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "robustness"
  config.seed = 0                 # Seeds the attacks' random starts (the data uses the run's seed).
  config.distributed = False      # Call jax.distributed.initialize() (multi-host TPU/GPU).
  # Multi-process (config.distributed=True): process 0's "host:port", the process count and this
  # process's index; ""/0/-1 = auto-detect (SLURM, Open MPI, Cloud TPU, $JAX_COORDINATOR_ADDRESS).
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
  config.distributed_timeout_seconds = 0  # Peer connect wait and lost-peer detection; 0 = JAX's.
  config.cpu_devices = 0     # >0: run the CPU as that many JAX devices (attacks: ~15% faster at 2).

  robustness = config.robustness = ml_collections.ConfigDict()
  robustness.checkpoint = "runs/train_digits"  # A training workdir, checkpoints/ or step folder.
  robustness.split = "test"       # test, val or train, as carved by the training run.
  robustness.max_examples = 0     # Attack the first N examples of the split; 0 = all.
  # Comma-separated: fgsm, pgd, apgd_ce, apgd_dlr, apgd_t, fab_t, square, autoattack.
  robustness.attacks = "pgd,apgd_ce"
  robustness.norm = "linf"        # linf or l2.
  robustness.eps = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)  # Budgets; images are in [0, 1].
  robustness.batch_size = 256     # Global batch, divisible over the devices; last one padded.
  # Keeping the attacked images costs N x image size per (attack, eps) on disk (e.g. 150 MB for
  # 10k CIFAR images), so only the per-example outcomes (success, steps, norm) are kept by default.
  robustness.save_adversarial = False
  robustness.data_dir = ""        # Where the run's data lives now, if moved; "" = as trained.

  robustness.pgd = ml_collections.ConfigDict()
  robustness.pgd.steps = 10
  robustness.pgd.step_size_factor = 2.5  # Step = factor * eps / steps (Madry et al.).
  robustness.pgd.step_size = 0.0         # Absolute step instead, if > 0.
  robustness.pgd.restarts = 1
  robustness.pgd.random_start = True

  # apgd_ce and apgd_dlr: step-size free (Croce & Hein 2020); AutoAttack's 100 iterations (20
  # were measured 1.6 points weaker than 50 at 8/255 on Fashion-MNIST).
  robustness.apgd = ml_collections.ConfigDict()
  robustness.apgd.steps = 100
  robustness.apgd.restarts = 1
  robustness.apgd.rho = 0.75
  robustness.apgd.momentum = 0.75

  robustness.apgd_t = ml_collections.ConfigDict()  # Targeted DLR, one run per target class.
  robustness.apgd_t.steps = 100
  robustness.apgd_t.target_classes = 9   # The most likely wrong classes (capped at classes-1).

  robustness.fab = ml_collections.ConfigDict()     # fab_t: minimal-norm, counted within eps.
  robustness.fab.steps = 100
  robustness.fab.target_classes = 9

  robustness.square = ml_collections.ConfigDict()  # Score-based: forward passes only.
  robustness.square.queries = 5000
  robustness.square.p_init = 0.8

  # autoattack: apgd_ce, apgd_t, fab_t, square, each on the points the previous left robust,
  # with the reference's settings; version "custom" runs autoattack.attacks instead. Component
  # settings come from sub-sections of this one (robustness.autoattack.square.queries, ...).
  robustness.autoattack = ml_collections.ConfigDict()
  robustness.autoattack.version = "standard"
  return config
