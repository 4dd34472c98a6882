"""The offline demo path: procedural assets written from the config, training, zero-shot well above chance."""

import json

from cg3d_jax.data import shapes
from cg3d_jax.train import loop
from configs import demo
from tests.conftest import TINY_CLIP


def test_demo_writes_its_assets_and_learns_zero_shot(tmp_path):
  c = demo.get_config()
  c.demo.root = str(tmp_path / 'assets')
  c.demo.synthetic.update(dict(num_train_per_class=8, num_test_per_class=3, num_points=256, image_size=32))
  c.demo.clip.update(TINY_CLIP)
  c.model.embed_dim = TINY_CLIP['projection_dim']
  c.model.num_points = 64
  c.model.point_transformer.update(dict(width=32, depth=2, num_heads=2, num_groups=16, group_size=8,
                                        encoder_dim=32))
  c.data.num_stored_points = 256
  c.train.batch_size = 16
  c.train.total_steps = 120  # a smaller budget than the demo's own (see README for its figure)
  c.train.encoder_optim.lr = 2e-3
  c.train.log_every = 20
  c.eval.every_steps = 120
  c.checkpoint.async_save = False
  c.logging.tensorboard = False
  result = loop.train(c, str(tmp_path / 'run'))

  # The config now points at the written assets, and they are what the demo promised.
  assert c.clip.path == str(tmp_path / 'assets' / 'clip')
  assert json.loads((tmp_path / 'assets' / 'clip' / 'config.json').read_text())['model_type'] == 'clip'
  assert (tmp_path / 'assets' / 'shapenet55' / 'train_img.txt').read_text().count('\n') == 8 * len(shapes.FAMILIES)
  chance = 1 / len(shapes.FAMILIES)
  assert result['val/count'] == 3 * len(shapes.FAMILIES)
  assert result['val/top1'] >= 3 * chance, result
