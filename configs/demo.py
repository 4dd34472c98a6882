"""CPU-sized demo: a procedural dataset in the ShapeNet-55 layout, a small random CLIP, a small PointTransformer.

  python -m cg3d_jax.demo_assets --config demo --root /tmp/cg3d_demo/demo_assets   # prints the three overrides:
  python -m cg3d_jax.train --config demo --workdir /tmp/cg3d_demo --config.data.manual_dir=... \
      --config.data.data_dir=... --config.clip.path=...

(`python -m cg3d_jax.demo` runs both, and the rest of the demo.) Everything is offline.
"""

from cg3d_jax.configs import base


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.model.num_points = 256
  c.model.embed_dim = c.demo.clip.projection_dim  # the encoder projects into the small CLIP's joint space
  c.model.point_transformer.update(dict(width=96, depth=3, num_heads=3, num_groups=32, group_size=16, encoder_dim=96))
  c.data.num_stored_points = 1024
  c.train.batch_size = 32
  c.train.total_steps = 300
  c.train.log_every = 20
  c.train.encoder_optim.lr = 5e-4
  c.train.prompt_optim.lr = 1e-2
  c.eval.every_steps = 100
  # With a random CLIP, "This is a {}" has no relation to the training captions; their 63-template ensemble does.
  c.eval.templates = 'cg3d'
  c.eval.max_examples = 256
  c.checkpoint.every_steps = 100
  return c
