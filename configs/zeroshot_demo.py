"""Zero-shot classification on the demo's held-out procedural objects (the test split of its ShapeNet-55 layout).

  python -m cg3d_jax.evaluate --config zeroshot_demo --checkpoint /tmp/cg3d_demo \
      --config.eval.data_dir=/tmp/cg3d_demo/demo_assets/tfds --workdir /tmp/cg3d_demo/zeroshot

Scores with the 63 training caption templates as an ensemble: the demo's CLIP has random weights, so CG3D's single
"This is a {}" caption carries no relation to what the encoder was trained against (see demo).
`python -m cg3d_jax.demo` runs this with the paths filled in.
"""

from cg3d_jax.configs import zeroshot_modelnet40


def get_config(arg=None):
  c = zeroshot_modelnet40.zeroshot_config('shapenet55_cg3d', 1024, arg)
  c.eval.templates = 'cg3d'
  c.eval.batch_size = 32
  return c
