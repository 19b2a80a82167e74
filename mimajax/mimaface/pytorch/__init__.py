"""MIMAFace in PyTorch (the `torch` extra): MIA and the pipeline that runs a `mimajax export` folder."""

from mimajax.mimaface.pytorch.mia import MotionIdentityAdapter, ReleaseMIA, build_mia
from mimajax.mimaface.pytorch.pipeline import MIMAFacePipeline

__all__ = ["MIMAFacePipeline", "MotionIdentityAdapter", "ReleaseMIA", "build_mia"]
