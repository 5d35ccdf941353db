#!/usr/bin/env python3
"""Cross-check of this project's AutoAttack against torchattacks at the original iteration counts.

Four steps, the first two in the project's venv, the third in a torch-only venv (torch never
becomes a dependency of the project), then a comparison:

    python benchmarks/autoattack_reference.py export --checkpoint runs/fashion_mnist \\
        --examples 1000 --dir /tmp/aa
    python benchmarks/autoattack_reference.py project --dir /tmp/aa --eps 2,4,8
    /tmp/torchvenv/bin/python benchmarks/autoattack_reference.py reference --dir /tmp/aa \\
        --eps 8 --examples 200
    python benchmarks/autoattack_reference.py compare --dir /tmp/aa
    python benchmarks/autoattack_reference.py flags --dir /tmp/aa   # float and 2-bit networks

`export` ports the checkpoint's small_cnn (BatchNorm in eval mode) to a PyTorch state dict
(`model.npz`) and writes the first N test images, labels and the JAX logits (`data.npz`).
`reference` rebuilds the network in PyTorch (the classes of `torch_pgd_reference.py`), checks
that its logits equal the JAX ones, and runs torchattacks 3.5.1's APGD (CE and DLR), APGDT, FAB
(multi-targeted) and Square with AutoAttack's original settings (100 iterations, 9 target classes,
5,000 queries, one restart; torchattacks' own `AutoAttack` uses 10 iterations, its issue #196),
each alone on all points and as a `MultiAttack` cascade in AutoAttack's order. `project` runs the
same with this project's attacks. Eps are in 1/255 units. Results: project.json,
reference.json and, from `compare`, comparison.md.

Reference setup (the machine's pip has local wheels):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy scipy \\
        tqdm requests && /tmp/torchvenv/bin/pip install --no-deps torchattacks==3.5.1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ATTACKS = ("apgd_ce", "apgd_t", "fab_t", "square", "autoattack")
EXTRA = ("apgd_dlr",)


def _eps_list(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v.strip()]


def _write_json(path: Path, record: dict) -> None:
  path.write_text(json.dumps(record, indent=1, sort_keys=True))


def _load_json(path: Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------------ project side (JAX)


def export(args: argparse.Namespace) -> None:
  """The checkpoint as a PyTorch state dict, plus the first N test images and JAX logits."""
  import jax.numpy as jnp

  from adcorda_jax.data import load_dataset
  from adcorda_jax.training import checkpointing
  from adcorda_jax.training.provenance import training_data

  variables, meta = checkpointing.load_checkpoint(args.checkpoint)
  if meta["model"]["name"] != "small_cnn":
    raise SystemExit(f"only small_cnn checkpoints are ported, got {meta['model']['name']!r}")
  model = checkpointing.model_from_meta(meta)
  data_config, seed, _ = training_data(Path(args.checkpoint), meta, "")
  dataset = load_dataset(data_config, seed)
  images = dataset.test.images[:args.examples].astype(np.float32)
  labels = dataset.test.labels[:args.examples].astype(np.int64)
  logits = np.asarray(model.apply(variables, jnp.asarray(images)))
  params, stats = variables["params"], variables["batch_stats"]
  state = {"normalize.mean": np.asarray(model.mean, np.float32).reshape(1, -1, 1, 1),
           "normalize.std": np.asarray(model.std, np.float32).reshape(1, -1, 1, 1)}
  for index in range(1, 5):
    state[f"conv{index}.weight"] = np.asarray(params[f"conv{index}"]["kernel"]).transpose(3, 2, 0, 1)
    state[f"bn{index}.weight"] = np.asarray(params[f"bn{index}"]["scale"])
    state[f"bn{index}.bias"] = np.asarray(params[f"bn{index}"]["bias"])
    state[f"bn{index}.running_mean"] = np.asarray(stats[f"bn{index}"]["mean"])
    state[f"bn{index}.running_var"] = np.asarray(stats[f"bn{index}"]["var"])
  hidden = np.asarray(params["hidden"]["kernel"])          # [H*W*C, 128], NHWC flattening.
  channels = state["conv4.weight"].shape[0]
  side = int(round((hidden.shape[0] // channels) ** 0.5))
  # PyTorch flattens NCHW: reorder the rows from (h, w, c) to (c, h, w).
  state["hidden.weight"] = (hidden.reshape(side, side, channels, -1).transpose(3, 2, 0, 1)
                            .reshape(hidden.shape[1], -1))
  state["hidden.bias"] = np.asarray(params["hidden"]["bias"])
  state["classifier.weight"] = np.asarray(params["classifier"]["kernel"]).T
  state["classifier.bias"] = np.asarray(params["classifier"]["bias"])
  out = Path(args.dir)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / "model.npz", **state)
  np.savez(out / "data.npz", images=images, labels=labels, logits=logits)
  _write_json(out / "meta.json", {"checkpoint": str(args.checkpoint), "model": meta["model"],
                                  "num_classes": meta["num_classes"],
                                  "examples": int(len(labels)),
                                  "clean_accuracy": float(np.mean(logits.argmax(1) == labels))})
  print(f"exported {len(labels)} examples and the model to {out}")


def project(args: argparse.Namespace) -> None:
  """This project's attacks, alone and as the standard cascade, timed per (attack, eps)."""
  import jax

  from adcorda_jax.attacks import attack_model, driver, ensemble, specs
  from adcorda_jax.training import checkpointing, sharding

  out = Path(args.dir)
  meta = _load_json(out / "meta.json")
  variables, checkpoint_meta = checkpointing.load_checkpoint(meta["checkpoint"])
  model = checkpointing.model_from_meta(checkpoint_meta)
  logits_fn, params = attack_model(model, variables)
  with np.load(out / "data.npz") as data:
    images, labels = data["images"][:args.examples], data["labels"][:args.examples]
  mesh = sharding.make_mesh()
  standard = ensemble.autoattack_spec("linf")
  by_name = {c.name: c for c in standard.components}
  by_name["apgd_dlr"] = specs.AttackSpec("apgd_dlr", steps=100)
  by_name["autoattack"] = standard
  names = [n for n in args.attacks.split(",") if n]
  path = out / "project.json"
  results = _load_json(path)
  for eps_255 in _eps_list(args.eps):
    for name in names:
      key = f"{name}@{eps_255:g}#{len(labels)}"
      if key in results:
        continue
      start = time.perf_counter()
      result = driver.attack_split(by_name[name], logits_fn, params, images, labels,
                                   eps=eps_255 / 255, batch_size=args.batch_size,
                                   key=jax.random.key(0), mesh=mesh, description=key)
      seconds = time.perf_counter() - start
      record = {"robust_accuracy": result.robust_accuracy, "seconds": seconds,
                "attack_seconds": result.seconds, "examples": len(labels),
                "clean_accuracy": result.clean_accuracy}
      if result.details:
        record["cascade"] = result.details["cascade"]
      results[key] = record
      _write_json(path, results)
      print(f"project {key}: robust accuracy {result.robust_accuracy:.4f}, {seconds:.1f} s",
            flush=True)


def flags(args: argparse.Namespace) -> None:
  """AutoAttack's sanity flags for the float network and 2-bit quantized ones (STE and BPDA).

  The Square check runs a short custom cascade (APGD-CE, then Square with --queries queries)
  at --eps/255 on the first --examples points.
  """
  import jax

  from adcorda_jax.attacks import attack_model, driver, ensemble, flags as flags_lib
  from adcorda_jax.quant.calibration import calibrate_activations
  from adcorda_jax.quant.fake_quant import QuantSpec
  from adcorda_jax.quant.quantized_model import quantized_logits_fn
  from adcorda_jax.training import checkpointing, sharding

  out = Path(args.dir)
  meta = _load_json(out / "meta.json")
  variables, checkpoint_meta = checkpointing.load_checkpoint(meta["checkpoint"])
  model = checkpointing.model_from_meta(checkpoint_meta)
  with np.load(out / "data.npz") as data:
    images, labels = data["images"][:args.examples], data["labels"][:args.examples]
  two_bits = QuantSpec(bits=2, per_channel=True, symmetric=True)
  activations = QuantSpec(bits=2, per_channel=False, symmetric=False)
  activation_scales = calibrate_activations(model, variables, [images], activations, "minmax")
  networks = {"float": attack_model(model, variables)[0]}
  for gradient in ("ste", "bpda"):
    networks[f"w2 {gradient}"] = quantized_logits_fn(model, two_bits,
                                                    straight_through=gradient == "ste")
    networks[f"w2a2 {gradient}"] = quantized_logits_fn(
        model, two_bits, activation_scales=activation_scales, activation_spec=activations,
        straight_through=gradient == "ste")
  spec = ensemble.autoattack_spec("linf", "custom", "apgd_ce,square",
                                  {"square": {"queries": args.queries}})
  records = {}
  for name, logits_fn in networks.items():
    checks = flags_lib.model_flags(logits_fn, variables, images, labels)
    result = driver.attack_split(spec, logits_fn, variables, images, labels, eps=args.eps / 255,
                                 batch_size=len(labels), key=jax.random.key(0),
                                 mesh=sharding.make_mesh())
    reported = flags_lib.report_flags(
        checks, flags_lib.split_square_gains([("autoattack", args.eps / 255, result)]), name)
    reported.update(clean_accuracy=result.clean_accuracy, robust_accuracy=result.robust_accuracy,
                    cascade=result.details["cascade"])
    records[name] = reported
    print(f"{name}: clean {result.clean_accuracy:.3f}, robust {result.robust_accuracy:.3f}, "
          f"zero-gradient points {checks['zero_gradient_fraction']:.1%}, square gain "
          f"{next(iter(reported['square_gain'].values()), 0.0):.1%}, warnings: "
          f"{reported['warnings'] or 'none'}", flush=True)
  _write_json(out / "flags.json", records)


# ---------------------------------------------------------------- reference side (PyTorch)


def reference(args: argparse.Namespace) -> None:
  """torchattacks at AutoAttack's original settings, on the ported network."""
  import torch
  import torchattacks

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from torch_pgd_reference import SmallCNN

  out = Path(args.dir)
  meta = _load_json(out / "meta.json")
  with np.load(out / "model.npz") as state, np.load(out / "data.npz") as data:
    model = SmallCNN(num_classes=meta["num_classes"], mean=(0.0,), std=(1.0,))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    images = torch.from_numpy(data["images"][:args.examples]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(data["labels"][:args.examples])
    jax_logits = data["logits"][:args.examples]
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  with torch.no_grad():
    torch_logits = model(images).numpy()
  difference = float(np.max(np.abs(torch_logits - jax_logits)))
  print(f"ported model: max |logit difference| {difference:.2e}; torch threads "
        f"{torch.get_num_threads()}", flush=True)
  if difference > 1e-3:
    raise SystemExit("the ported network does not reproduce the JAX logits")
  classes = meta["num_classes"]
  path = out / "reference.json"
  results = _load_json(path)
  results["port_max_logit_difference"] = difference

  def build(name: str, eps: float):
    common = dict(norm="Linf", eps=eps, seed=0)
    if name == "apgd_ce":
      return torchattacks.APGD(model, steps=100, n_restarts=1, loss="ce", **common)
    if name == "apgd_dlr":
      return torchattacks.APGD(model, steps=100, n_restarts=1, loss="dlr", **common)
    if name == "apgd_t":
      return torchattacks.APGDT(model, steps=100, n_restarts=1, n_classes=classes, **common)
    if name == "fab_t":
      return torchattacks.FAB(model, steps=100, n_restarts=1, multi_targeted=True,
                              n_classes=classes, **common)
    if name == "square":
      return torchattacks.Square(model, n_queries=5000, n_restarts=1, p_init=0.8, **common)
    return torchattacks.MultiAttack([build(n, eps) for n in ("apgd_ce", "apgd_t", "fab_t",
                                                            "square")])

  for eps_255 in _eps_list(args.eps):
    for name in [n for n in args.attacks.split(",") if n]:
      key = f"{name}@{eps_255:g}#{len(labels)}"
      if key in results:
        continue
      attack = build(name, eps_255 / 255)
      start = time.perf_counter()
      adversarial = torch.cat([attack(images[i:i + args.batch_size],
                                      labels[i:i + args.batch_size])
                               for i in range(0, len(labels), args.batch_size)])
      seconds = time.perf_counter() - start
      with torch.no_grad():
        correct = (model(adversarial).argmax(1) == labels).numpy()
      linf = float((adversarial - images).abs().amax().item())
      results[key] = {"robust_accuracy": float(correct.mean()), "seconds": seconds,
                      "examples": int(len(labels)), "max_linf": linf,
                      "correct": correct.astype(int).tolist()}
      _write_json(path, results)
      print(f"reference {key}: robust accuracy {correct.mean():.4f}, {seconds:.1f} s, "
            f"max linf {linf * 255:.3f}/255", flush=True)


# ------------------------------------------------------------------------------- comparison


def compare(args: argparse.Namespace) -> None:
  """Markdown tables: robust accuracy (project vs reference) and seconds, per attack and eps."""
  out = Path(args.dir)
  ours, theirs = _load_json(out / "project.json"), _load_json(out / "reference.json")
  def order(key):
    name, rest = key.split("@")
    eps, examples = rest.split("#")
    return float(eps), ATTACKS.index(name) if name in ATTACKS else -1, int(examples)

  keys = sorted((k for k in set(theirs) | set(ours) if "@" in k), key=order)
  lines = ["| eps | attack | examples | project | reference | difference (points) | "
           "project s | reference s | speed-up |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for key in keys:
    name, rest = key.split("@")
    eps, examples = rest.split("#")
    mine, ref = ours.get(key), theirs.get(key)
    if mine is None or ref is None:  # Only one side ran it (e.g. the project on more points).
      run = mine or ref
      cells = (f"{100 * run['robust_accuracy']:.1f}% | - | | {run['seconds']:.1f} | | |"
               if mine else f"- | {100 * run['robust_accuracy']:.1f}% | | | {run['seconds']:.1f} | |")
      lines.append(f"| {eps}/255 | {name} | {examples} | {cells}")
      continue
    lines.append(
        f"| {eps}/255 | {name} | {examples} | {100 * mine['robust_accuracy']:.1f}% | "
        f"{100 * ref['robust_accuracy']:.1f}% | "
        f"{100 * (mine['robust_accuracy'] - ref['robust_accuracy']):+.1f} | "
        f"{mine['seconds']:.1f} | {ref['seconds']:.1f} | {ref['seconds'] / mine['seconds']:.1f}x |")
  text = "\n".join(lines) + "\n"
  (out / "comparison.md").write_text(text)
  print(text)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  for name in ("export", "project", "reference", "compare", "flags"):
    command = commands.add_parser(name)
    command.add_argument("--dir", required=True, help="folder for the exported model and results")
    if name == "export":
      command.add_argument("--checkpoint", required=True, help="a small_cnn training workdir")
      command.add_argument("--examples", type=int, default=1000)
    if name in ("project", "reference"):
      command.add_argument("--eps", default="2,4,8", help="comma-separated, in 1/255")
      command.add_argument("--attacks", default=",".join(ATTACKS))
      command.add_argument("--examples", type=int, default=1000,
                           help="attack the first N exported examples")
      command.add_argument("--batch-size", type=int, default=500)
    if name == "flags":
      command.add_argument("--examples", type=int, default=100)
      command.add_argument("--eps", type=float, default=8.0, help="in 1/255")
      command.add_argument("--queries", type=int, default=1000, help="Square's queries")
  args = parser.parse_args(argv)
  {"export": export, "project": project, "reference": reference, "compare": compare,
   "flags": flags}[args.command](args)


if __name__ == "__main__":
  main()
