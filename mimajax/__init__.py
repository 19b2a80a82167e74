"""mimajax: MIMAFace and MMFA in JAX/Flax NNX."""

from flax import nnx as _nnx

# Parameters carry logical axis names only; they are placed on a mesh by the training code
# (`jax.jit` with shardings from the config's rules), never eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
