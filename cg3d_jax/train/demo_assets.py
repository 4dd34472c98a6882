"""The offline demo's inputs: a procedural ShapeNet-55-layout dataset and a small random transformers CLIP.

Both are written once under `config.demo.root` (default `<workdir>/demo_assets`) and reused afterwards; the config
is pointed at them, so the rest of training runs exactly the code paths that real data and a real CLIP take.
"""

import os
import pathlib

from absl import logging

from cg3d_jax.data.synthetic import SyntheticSettings, ensure_synthetic_shapenet
from cg3d_jax.weights.random_clip import write_random_clip


def prepare(config, workdir: str) -> None:
  """Writes what is missing and sets config.data.manual_dir / data_dir and config.clip.path."""
  root = pathlib.Path(config.demo.root or os.path.join(workdir, 'demo_assets')).resolve()
  syn = config.demo.synthetic
  settings = SyntheticSettings(seed=syn.seed, num_train_per_class=syn.num_train_per_class,
                               num_test_per_class=syn.num_test_per_class, num_points=syn.num_points,
                               image_size=syn.image_size, num_views=syn.num_views)
  logging.info('demo: procedural dataset in %s', root / 'shapenet55')
  ensure_synthetic_shapenet(root / 'shapenet55', settings)

  clip_dir = root / 'clip'
  if not (clip_dir / 'config.json').is_file():
    vocab = config.demo.vocab_path
    if vocab and not pathlib.Path(vocab).is_file():
      raise FileNotFoundError(f'config.demo.vocab_path: the CLIP BPE vocabulary {vocab} does not exist (leave it '
                              "unset to use the package's own copy)")
    logging.info('demo: writing a random CLIP to %s', clip_dir)
    write_random_clip(clip_dir, vocab_path=vocab or None, **dict(config.demo.clip))
  config.data.manual_dir = str(root / 'shapenet55')
  config.data.data_dir = config.data.data_dir or str(root / 'tfds')
  config.clip.path = str(clip_dir)
