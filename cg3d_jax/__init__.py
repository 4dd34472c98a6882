"""cg3d-jax: CG3D ("CLIP goes 3D") in JAX/Flax."""

__version__ = '0.1.0'
