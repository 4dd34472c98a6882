"""The offline demo path (conftest.demo_run: the demo command at the test size): its procedural assets are what the
config promised, and training learned zero-shot well above chance, in the training run's validation and in the
demo's own `evaluate` step."""

import json

from cg3d_jax.metric_writer import read_jsonl
from cg3d_jax.synthetic import shapes
from tests.conftest import DEMO_OVERRIDES


def test_demo_writes_its_assets_and_learns_zero_shot(demo_run):
  assets = demo_run.workdir / 'demo_assets'
  assert json.loads((assets / 'clip' / 'config.json').read_text())['model_type'] == 'clip'
  per_class = DEMO_OVERRIDES['demo.synthetic.num_train_per_class']
  assert (assets / 'shapenet55' / 'train_img.txt').read_text().count('\n') == per_class * len(shapes.FAMILIES)
  (val,) = [row for row in read_jsonl(str(demo_run.workdir / 'train.jsonl')) if 'val/top1' in row]
  chance = 1 / len(shapes.FAMILIES)
  assert val['step'] == DEMO_OVERRIDES['train.total_steps']
  assert val['val/count'] == DEMO_OVERRIDES['demo.synthetic.num_test_per_class'] * len(shapes.FAMILIES)
  assert val['val/top1'] >= 4 * chance, val
  # The demo's evaluate step scores the same held-out objects with the final checkpoint.
  results = json.loads((demo_run.workdir / 'zeroshot' / 'results.json').read_text())
  assert results['num_objects'] == val['val/count'] and results['top1_acc'] >= 100 * 4 * chance, results
