"""Base config: train the small CNN on scikit-learn's bundled digits (8x8, offline, seconds).

    python main.py --config configs/train_digits.py --workdir runs/train_digits

Expected: test accuracy >= 0.95 in well under a minute on 2 CPU cores (compile included).
Every other config (configs/default.py included) imports this one and overrides a few fields.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "train"          # What main.py runs; see adcorda_jax.tasks.TASKS.
  config.seed = 0                # Seeds splits, shuffling, initialization and augmentation.
  config.distributed = False     # Call jax.distributed.initialize() (multi-host TPU/GPU).
  # Multi-process (config.distributed=True): process 0's "host:port", the process count and this
  # process's index; ""/0/-1 = auto-detect (SLURM, Open MPI, Cloud TPU, $JAX_COORDINATOR_ADDRESS).
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
  config.distributed_timeout_seconds = 0  # Peer connect wait and lost-peer detection; 0 = JAX's.
  config.cpu_devices = 0     # >0: run the CPU as that many JAX devices (attacks: ~15% faster at 2).

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"        # digits, mnist, fashion_mnist, image_folder, or a TFDS name.
  config.data.val_fraction = 0.1     # Held-out validation share carved (stratified) from train.
  config.data.test_fraction = 0.2    # Test share carved from sources without a test split.
  config.data.max_train_examples = 0  # Subsample train for quick runs; 0 keeps all.
  config.data.data_dir = ""          # IDX folder (mnist/fashion_mnist) or image_folder root.
  config.data.test_dir = ""          # image_folder: separate test folder (optional).
  config.data.image_size = 32        # image_folder: images are resized to this square size.
  config.data.grayscale = False      # image_folder: load as 1-channel images.
  config.data.tfds_data_dir = ""     # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets).
  config.data.tfds_download = True   # Let TFDS download/prepare missing datasets.
  config.data.augment = False        # Random crop (see train.augment_padding) + horizontal flip.
  # Training splits: "device" keeps them on the devices (batches gathered by index in a jitted
  # program), "host" prefetches each next batch; "auto" = device when a copy fits in
  # device_memory_fraction of device memory. Same batches, same results either way.
  config.data.placement = "auto"
  config.data.device_memory_fraction = 0.25

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"    # See adcorda_jax.models.MODELS.
  config.model.width = 1.0           # Channel multiplier.
  config.model.dropout = 0.0         # small_cnn head dropout.
  # Weight quantization, used by task=quantize and task=adcorda (the trained baseline stays float).
  config.model.quant = ml_collections.ConfigDict()
  config.model.quant.weight_bits = 0           # 2..8; 0 = float weights.
  config.model.quant.per_channel = True        # One scale per output channel (else per tensor).
  config.model.quant.symmetric = True          # Signed grid, zero point 0 (else asymmetric).
  config.model.quant.activation_bits = 0       # 2..16 quantizes every conv/dense input (quantize).
  config.model.quant.calibration = "mse"       # minmax, percentile or mse (weight grids).
  config.model.quant.fold_batch_norm = False   # Fold BN into convs before calibrating (quantize).
  config.model.quant.attack_gradient = "ste"   # ste or bpda (float-model gradients) for attacks.

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 30
  config.train.batch_size = 64       # Global batch; must divide over the devices.
  config.train.eval_batch_size = 256  # Last eval batch is padded and masked, never dropped.
  config.train.optimizer = "sgd"     # sgd (momentum) or adamw.
  config.train.learning_rate = 0.05  # Peak learning rate after warmup.
  config.train.momentum = 0.9
  config.train.nesterov = True
  config.train.weight_decay = 5e-4   # Decoupled, on conv/dense kernels only.
  config.train.schedule = "cosine"   # cosine, step or constant (after linear warmup).
  config.train.warmup_epochs = 1.0
  config.train.step_boundaries = (0.5, 0.75)  # step schedule: fractions of training.
  config.train.step_decay = 0.1      # step schedule: factor at each boundary.
  config.train.label_smoothing = 0.0
  # Training compute dtype: float32, or bfloat16 (mixed precision: parameters, optimizer state,
  # BatchNorm statistics and the loss stay float32; evaluation and attacks run in float32).
  config.train.compute_dtype = "float32"
  config.train.augment_padding = 4   # Crop padding when data.augment is on.
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 0  # 0 = once per epoch.
  config.train.max_checkpoints = 2
  return config
