"""Markdown tables of `task=benchmark_attack` and `task=benchmark_train` records."""
from __future__ import annotations

from typing import Any, Sequence

_REFERENCE = "autodiff"


def benchmark_markdown(records: Sequence[dict[str, Any]]) -> str:
  """One row per record, with the speed-up over the plain autodiff program of the same case."""
  if not records:
    return "# Attack throughput\n\nNo records.\n"
  first = records[0]
  baseline = {(r["model"], r["batch"], r["devices"]): r["img_steps_per_second"]
              for r in records if r["implementation"] == _REFERENCE}
  lines = [
      "# Attack throughput",
      "",
      f"{first['steps']}-step L-inf PGD with random start, every step taken; median of "
      f"{first['repeats']} interleaved runs after a warm-up. Backend: {first['backend']}; "
      f"measured float32 matmul peak: {first['peak_gflops']:.0f} GFLOP/s. FLOPs per img*step "
      "are XLA's cost analysis of the plain autodiff step (the useful work).",
      "",
      "| model | batch | devices | implementation | img*step/s (min-max) | vs autodiff "
      "| compile s | MFLOP/img*step | fraction of peak |",
      "|---|---:|---:|---|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    reference = baseline.get((r["model"], r["batch"], r["devices"]))
    speedup = f"{r['img_steps_per_second'] / reference:.2f}x" if reference else "-"
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['devices']} | {r['implementation']} "
        f"| {r['img_steps_per_second']:,.0f} ({r['img_steps_per_second_min']:,.0f}-"
        f"{r['img_steps_per_second_max']:,.0f}) | {speedup} | {r['compile_seconds']:.1f} "
        f"| {r['flops_per_img_step'] / 1e6:.1f} | {100 * r['fraction_of_peak']:.0f}% |")
  lines += [
      "",
      "Implementations: `autodiff` = flax model + `jax.grad`, XLA defaults (the straightforward "
      "program); `autodiff_tuned_xla` = the same with the attack programs' compiler options; "
      "`fast_vjp` = convolutions with the custom input-gradient VJP, XLA defaults; "
      "`fast_vjp_tuned_xla` = the custom VJP with YNNPACK fusions off, all convolutions "
      "XLA's; `adcorda_unfused` = the custom VJP on the native CPU convolution kernel where it "
      "could be built, XLA's default options, BatchNorm/ReLU/residual as XLA passes; `adcorda` = "
      "the same with BatchNorm folded into the convolutions and bias, residual and ReLU fused "
      "into them (what the library's attacks use).",
      ""]
  lines += _variant_lines(records)
  return "\n".join(lines)


def train_benchmark_markdown(records: Sequence[dict[str, Any]]) -> str:
  """One row per record, with the speed-up over the plain program of the same case."""
  if not records:
    return "# Train-step throughput\n\nNo records.\n"
  first = records[0]
  plain = {(r["model"], r["batch"]): r["img_per_second"]
           for r in records if r["implementation"] == "plain"}
  lines = [
      "# Train-step throughput",
      "",
      f"`training.steps.train_step` (SGD with Nesterov momentum, BatchNorm in train mode, random "
      f"data), {first['steps']} steps per run, median of {first['repeats']} interleaved runs "
      f"after a warm-up. Backend: {first['backend']}; measured float32 matmul peak: "
      f"{first['peak_gflops']:.0f} GFLOP/s. FLOPs per image are XLA's cost analysis of the plain "
      "step (custom calls report none).",
      "",
      "| model | batch | implementation | img/s (min-max) | vs plain | compile s "
      "| MFLOP/img | fraction of peak |",
      "|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    reference = plain.get((r["model"], r["batch"]))
    speedup = f"{r['img_per_second'] / reference:.2f}x" if reference else "-"
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['implementation']} "
        f"| {r['img_per_second']:,.0f} ({r['img_per_second_min']:,.0f}-"
        f"{r['img_per_second_max']:,.0f}) | {speedup} | {r['compile_seconds']:.1f} "
        f"| {r['flops_per_img'] / 1e6:.1f} | {100 * r['fraction_of_peak']:.0f}% |")
  lines += ["", "Implementations: `plain` = flax's convolutions differentiated by autodiff on "
            "XLA; `adcorda` = the library's default on the CPU (`models.fast_path`: forward, "
            "input and kernel gradients on the native convolution kernel).", ""]
  lines += _variant_lines(records)
  return "\n".join(lines)


def _variant_lines(records: Sequence[dict[str, Any]]) -> list[str]:
  variants = sorted({r["native_variant"] for r in records if r.get("native_variant")})
  if not variants:
    return []
  return [f"Native kernel variant (tuned for this CPU): {', '.join(variants)}.", ""]
