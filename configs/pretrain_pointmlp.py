"""CG3D pre-training with the PointMLP encoder: the original recipe.

Batch 32, AdamW 1e-4 (wd 0.1) cosine per epoch to 1e-6 over 100 epochs; prompts SGD 1e-2 (momentum 0.9).
"""

from cg3d_jax.configs import base


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.model.encoder = 'pointmlp'
  c.train.batch_size = 32
  c.train.encoder_optim.lr = 1e-4
  c.train.encoder_optim.weight_decay = 0.1
  c.train.prompt_optim.lr = 1e-2
  return c
