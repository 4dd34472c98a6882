"""The offline demo path: procedural assets written from the config, training, zero-shot well above chance."""

import json

from cg3d_jax.synthetic import shapes


def test_demo_writes_its_assets_and_learns_zero_shot(demo_run):
  c, root, result = demo_run.config, demo_run.root, demo_run.result
  # The config now points at the written assets, and they are what the demo promised.
  assert c.clip.path == str(root / 'assets' / 'clip')
  assert json.loads((root / 'assets' / 'clip' / 'config.json').read_text())['model_type'] == 'clip'
  assert (root / 'assets' / 'shapenet55' / 'train_img.txt').read_text().count('\n') == 8 * len(shapes.FAMILIES)
  chance = 1 / len(shapes.FAMILIES)
  assert result['val/count'] == 3 * len(shapes.FAMILIES)
  assert result['val/top1'] >= 4 * chance, result
