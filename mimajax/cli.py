"""The `mimajax` command: dataset preparation, training, animation, export, parity checks and benchmarks."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.bench import add_arguments as loader_bench_arguments
from data_pipeline.motion_extraction import add_arguments as extract_motion_arguments
from data_pipeline.prepare import add_arguments as prepare_arguments
from mimajax import families
from mimajax.errors import CheckpointReadError
from mimajax.parity import COMPONENTS, PARITY_TOLERANCE


def _parity(args) -> int:
  fn = COMPONENTS[args.component]
  if args.component == "scheduler":
    if args.pretrained:
      print("--pretrained does not apply to --component scheduler (its config is SD1.5's)", file=sys.stderr)
      return 2
    err = fn(size=args.size, seed=args.seed)
  else:
    err = fn(size=args.size, pretrained=args.pretrained, seed=args.seed)
  ok = err <= PARITY_TOLERANCE
  print(f"{'PASS' if ok else 'FAIL'}: tolerance {PARITY_TOLERANCE:g} (fp32 relative L2)")
  print(f"rel_err={err:.3e}")
  return 0 if ok else 1


def _bench(args) -> int:
  if args.what == "loader":
    from data_pipeline import bench as loader_bench

    return loader_bench.run(args)

  import jax.numpy as jnp

  from configs import common
  from mimajax import bench
  from mimajax.models.unet_config import UNetConfig

  if args.what != "unet":
    print(f"unknown benchmark {args.what!r}; expected 'unet' or 'loader'", file=sys.stderr)
    return 2
  args.batch = args.batch or 1
  args.resolution = args.resolution or 256
  cfg = UNetConfig(**common.model_config(args.size).unet.to_dict())
  if args.block_out_channels:
    cfg = cfg.replace(block_out_channels=tuple(int(c) for c in args.block_out_channels.split(",")))
  result = bench.bench_unet(
    cfg,
    batch=args.batch,
    resolution=args.resolution,
    dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
    attention_impl=args.attention_impl,
    repeats=args.repeats,
    compare_torch=not args.no_torch,
  )
  if "ratio" in result:
    print(f"ratio={result['ratio']:.3f}")
  return 0


# Verbs every model family may offer, run by the family the --checkpoint belongs to.
FAMILY_VERBS = {
  "animate": "portrait + driving video | coefficients (e.g. SadTalker audio) | edits -> mp4",
  "export": "trained model -> PyTorch formats (MIMAFace: diffusers/transformers folders + SD single files)",
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mimajax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("parity", help="compare a component against its PyTorch reference; last line rel_err=")
  p.add_argument("--component", required=True, choices=sorted(COMPONENTS))
  p.add_argument("--size", default="tiny", choices=["tiny", "sd15"])
  p.add_argument("--pretrained", default=None, help="local diffusers folder (pipeline or component)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=_parity)

  b = sub.add_parser(
    "bench", help="unet: time a training step against PyTorch, last line ratio=; loader: last line clips_per_s="
  )
  b.add_argument("what", choices=["unet", "loader"])
  b.add_argument("--size", default="sd15", choices=["tiny", "sd15"], help="base U-Net config")
  b.add_argument("--block-out-channels", default="", help="override, e.g. 128,256,256")
  b.add_argument("--batch", type=int, default=None, help="unet: 1; loader: 8 clips (stage 2)")
  b.add_argument("--resolution", type=int, default=None, help="image pixels (unet: 256, latents are 1/8; loader: 512)")
  b.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 parameters)")
  b.add_argument("--attention-impl", default="blockwise", choices=["xla", "cudnn", "blockwise"])
  b.add_argument("--repeats", type=int, default=3)
  b.add_argument("--no-torch", action="store_true", help="time JAX only (e.g. on a GPU without torch)")
  loader_bench_arguments(b)
  b.set_defaults(fn=_bench)

  sub.add_parser(
    "train",
    help="train from a config: mimajax train --config configs/tiny.py --workdir DIR [--config.total_steps=6]",
    add_help=False,
  )

  p = sub.add_parser("prepare", help="videos + 3DMM coefficients -> ArrayRecord shards and manifest.json")
  prepare_arguments(p)
  p.set_defaults(fn=_prepare)

  for verb, what in FAMILY_VERBS.items():  # parsed by the family of the --checkpoint (see _family_verb)
    sub.add_parser(verb, help=what, add_help=False)

  e = sub.add_parser(
    "extract-motion", help="MediaPipe FaceMesh landmarks -> 261-column motion coefficients + face_model.npz"
  )
  extract_motion_arguments(e)
  e.set_defaults(fn=_extract_motion)
  return parser


def _family_verb(verb: str, argv: list[str]) -> int:
  """`mimajax animate|export ...`: the verb of the model family the --checkpoint was trained as.

  The family is read from the checkpoint (config.json's model.family; export and release folders are
  MIMAFace's), so a user never names it; without a readable --checkpoint the default family parses the
  arguments and reports what is wrong.
  """
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--checkpoint")
  known, _ = pre.parse_known_args(argv)
  name = families.DEFAULT_FAMILY
  if known.checkpoint:
    try:
      name = families.family_of_checkpoint(known.checkpoint)
    except CheckpointReadError:
      pass  # the family's own loader names what is wrong with the checkpoint
  family = families.get(name)
  command = family.commands.get(verb)
  if command is None:
    print(f"mimajax {verb}: the {name!r} model family has no {verb} command", file=sys.stderr)
    return 2
  parser = argparse.ArgumentParser(prog=f"mimajax {verb}", description=command.help)
  command.add_arguments(parser)
  return command.run(parser.parse_args(argv))


def _extract_motion(args) -> int:
  from data_pipeline import motion_extraction

  return motion_extraction.run(args)


def _prepare(args) -> int:
  from data_pipeline import prepare

  return prepare.run(args)


def _train(argv: list[str]) -> int:
  from mimajax import train

  return train.main(argv)


# Subcommands whose flags are absl / ml_collections flags (`--config.x=y` overrides), parsed by their module.
ABSL_COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in ABSL_COMMANDS:
    return ABSL_COMMANDS[argv[0]](argv[1:])
  if argv and argv[0] in FAMILY_VERBS:
    return _family_verb(argv[0], argv[1:])
  args = build_parser().parse_args(argv)
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
