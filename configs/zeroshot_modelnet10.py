"""Zero-shot classification on ModelNet10 (the 10-class subset's test split, 908 objects).

  python -m cg3d_jax.evaluate --config zeroshot_modelnet10 --checkpoint /runs/cg3d --workdir /tmp/zs10 \
      --config.eval.manual_dir=/data/modelnet40_normal_resampled --config.eval.data_dir=/data/tfds

arg: '' = CG3D's "This is a {}" with raw names; 'ulip' = ULIP's 64 templates with names as words.
"""

from cg3d_jax.configs import zeroshot_modelnet40


def get_config(arg=None):
  return zeroshot_modelnet40.zeroshot_config('modelnet10', 8192, arg)
