"""`mimajax export --checkpoint CKPT --out DIR`: any trained MIMAFace -> the folder PyTorch users load."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimajax import cli_errors
from mimajax.errors import CheckpointReadError
from mimajax.mimaface import export, inference

PROG = "mimajax export"


def add_arguments(parser) -> None:
  parser.add_argument("--checkpoint", required=True, help="training workdir, checkpoint step folder or release folder")
  parser.add_argument("--out", required=True, help="export folder to create (docs/export_layout.md)")
  parser.add_argument("--no-single-file", action="store_true", help="skip the SD / AnimateDiff single files")
  parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default) or not")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out export folder")
  parser.add_argument("--vae", default=None, help="diffusers VAE folder (release folders hold none)")
  parser.add_argument("--face-model", default=None, help="face model .npz / BFM .mat (default: the checkpoint's)")


def sources(args) -> list[Path]:
  """What the export reads: --checkpoint (and the workdir of a step folder inside one), --vae, --face-model."""
  found = [Path(p) for p in (args.checkpoint, args.vae, args.face_model) if p]
  checkpoint = Path(args.checkpoint).absolute()
  for folder in (checkpoint, *checkpoint.parents):  # a step folder reads config.json, vae/, ... of its workdir
    if (folder / "checkpoints").is_dir() and (folder / "config.json").is_file():
      found.append(folder)
      break
  return found


def run(args) -> int:
  """`mimajax export`: load_inference(--checkpoint) -> export_mimaface(--out); exit code (2: bad input)."""
  try:  # before the (slow) load: an --out that would destroy the checkpoint or a non-export is refused at once
    export.check_out_dir(args.out, sources=sources(args), overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    return cli_errors.report(PROG, e, code=cli_errors.BAD_INPUT)
  try:
    inf = inference.load_inference(args.checkpoint, use_ema=args.ema, vae_dir=args.vae,
                                       face_model_path=args.face_model)  # fmt: skip
  except (CheckpointReadError, FileNotFoundError) as e:
    return cli_errors.report(PROG, e, code=cli_errors.BAD_INPUT, context=f"cannot load --checkpoint {args.checkpoint}")
  try:
    out = export.export_mimaface(
      inf.model,
      inf.vae,
      args.out,
      config=inf.config,
      face_model=inf.face_model,
      overwrite=args.overwrite,
      single_file=not args.no_single_file,
      resolution=inf.resolution,
      num_frames=inf.num_frames,
      ica_frames=inf.ica_frames,
      sources=sources(args),
    )
  except (FileExistsError, ValueError) as e:
    return cli_errors.report(PROG, e, code=cli_errors.BAD_INPUT)
  print(f"exported {args.checkpoint} to {out}")
  return 0
