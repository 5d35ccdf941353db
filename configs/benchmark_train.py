"""Train-step throughput benchmark: plain flax/XLA convolutions vs the library's native path.

    python main.py --config configs/benchmark_train.py --workdir runs/benchmark_train

Cases are 'model/HxWxC/classes/batch'. Each implementation is compiled once per case and timed
interleaved with the other; see adcorda_jax/tasks/benchmark_train.py. Compare with PyTorch by
running benchmarks/torch_train_reference.py right after (same models and optimizer). About 3
minutes on a 2-core CPU. Results: results.json (`records`), report.md.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "benchmark_train"
  config.seed = 0
  config.distributed = False

  benchmark = config.benchmark = ml_collections.ConfigDict()
  benchmark.cases = "small_cnn/28x28x1/10/128,resnet20/32x32x3/10/128"
  benchmark.implementations = "plain,adcorda"  # Also: bfloat16 (train.compute_dtype=bfloat16).
  benchmark.steps = 10     # Train steps per timed run.
  benchmark.repeats = 5    # Timed runs per implementation, interleaved.
  return config
