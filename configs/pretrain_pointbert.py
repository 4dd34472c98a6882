"""CG3D pre-training with the PointTransformer (Point-BERT-style) encoder: the original recipe.

  python -m cg3d_jax.train --config pretrain_pointbert --workdir gs://bucket/run \
      --config.clip.path=/models/clip-vit-base-patch16 --config.data.manual_dir=/data/ShapeNet55

Batch 64, AdamW 5e-5 (wd 0.05) cosine per epoch to 1e-6 over 100 epochs for the 3D encoder; SGD 2e-3 (momentum
0.9, wd 1e-4) for 5 deep visual prompts; gradient clipping at 10 per group; fp32. arg `8192` trains on 8192 points.
"""

from cg3d_jax.configs import base


def get_config(arg=None):
  c = base.get_base_config()
  c.model.encoder = 'point_transformer'
  if arg == '8192':
    c.model.num_points = 8192
  elif arg not in (None, '', '1024'):
    raise ValueError(f'pretrain_pointbert: arg must be 1024 or 8192 (number of points), got {arg!r}')
  return c
