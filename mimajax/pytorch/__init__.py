"""MIMAFace in PyTorch (the `torch` extra): MIA and the pipeline that runs a `mimajax export` folder."""

from mimajax.pytorch.mia import MotionIdentityAdapter, ReleaseMIA, build_mia
from mimajax.pytorch.pipeline import MIMAFacePipeline

__all__ = ["MIMAFacePipeline", "MotionIdentityAdapter", "ReleaseMIA", "build_mia"]
