"""Attack throughput benchmark: 10-step L-inf PGD (eps 8/255, step 2/255, random start).

    python main.py --config configs/benchmark_attack.py --workdir runs/benchmark

Cases are 'model/HxWxC/classes/batch'. Each implementation is compiled once per case and device
count and timed interleaved with the others; see adcorda_jax/tasks/benchmark_attack.py. For
several CPU devices run with XLA_FLAGS=--xla_force_host_platform_device_count=4. Takes about
25 minutes on a 2-core CPU with the defaults, most of it in the plain-autodiff rows (leave them out
with --config.benchmark.implementations=fast_vjp_tuned_xla,adcorda for a 3-minute run). Results:
results.json (a list of records), report.md.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "benchmark_attack"
  config.seed = 0
  config.distributed = False
  config.cpu_devices = 4  # Split the CPU into 4 JAX devices to measure 1, 2 and 4; 0 = JAX default.

  benchmark = config.benchmark = ml_collections.ConfigDict()
  benchmark.cases = "small_cnn/28x28x1/10/512,resnet20/32x32x3/100/256"
  # autodiff, autodiff_tuned_xla, fast_vjp, fast_vjp_tuned_xla, adcorda_unfused (native
  # convolutions, BatchNorm/ReLU left to XLA: the previous release), adcorda (the library's path).
  benchmark.implementations = "autodiff,autodiff_tuned_xla,fast_vjp,fast_vjp_tuned_xla,adcorda"
  benchmark.devices = (1, 2, 4)   # Device counts <= jax.device_count() are measured.
  benchmark.steps = 10
  benchmark.eps = 8 / 255
  benchmark.step_size = 2 / 255
  benchmark.repeats = 5           # Timed runs per implementation, interleaved.
  return config
