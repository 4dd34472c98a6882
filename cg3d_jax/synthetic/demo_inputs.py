"""The offline demo's inputs: a procedural ShapeNet-55-layout dataset and a small random CLIP (a transformers folder,
or a SLIP file with config.demo.clip_kind='slip').

Both are written once under a root folder and reused afterwards (config.demo says their sizes); training is then
pointed at them like at real data and a real CLIP, so it runs exactly the code paths those take.
"""

import dataclasses
import pathlib

from absl import logging

from cg3d_jax.synthetic.objects import SyntheticSettings, ensure_synthetic_shapenet
from cg3d_jax.synthetic.random_clip import write_random_clip, write_random_slip


@dataclasses.dataclass(frozen=True)
class DemoAssets:
  manual_dir: str  # the procedural dataset in the ShapeNet-55 layout (config.data.manual_dir)
  data_dir: str  # where its TFDS build goes (config.data.data_dir)
  clip_path: str  # the random CLIP folder (config.clip.path)

  def overrides(self) -> list[str]:
    """The command-line overrides that point a config at these assets."""
    return [
      f'--config.data.manual_dir={self.manual_dir}',
      f'--config.data.data_dir={self.data_dir}',
      f'--config.clip.path={self.clip_path}',
    ]

  def apply(self, config) -> None:
    config.data.manual_dir, config.data.data_dir, config.clip.path = self.manual_dir, self.data_dir, self.clip_path


def write(root, demo_config) -> DemoAssets:
  """Writes what is missing under `root` (shapenet55/, clip/; tfds/ is filled by the first training run). The sizes
  were checked with the rest of the config (training/config_checks.check_demo_run)."""
  root = pathlib.Path(root).resolve()
  syn = demo_config.synthetic
  settings = SyntheticSettings(
    seed=syn.seed,
    num_train_per_class=syn.num_train_per_class,
    num_test_per_class=syn.num_test_per_class,
    num_points=syn.num_points,
    image_size=syn.image_size,
    num_views=syn.num_views,
  )
  logging.info('demo: procedural dataset in %s', root / 'shapenet55')
  ensure_synthetic_shapenet(root / 'shapenet55', settings)
  kind = demo_config.clip_kind
  if kind == 'slip':
    return DemoAssets(
      manual_dir=str(root / 'shapenet55'),
      data_dir=str(root / 'tfds'),
      clip_path=_write_slip(root / 'slip.pt', demo_config.clip),
    )
  clip_dir = root / 'clip'
  if not (clip_dir / 'config.json').is_file():
    vocab = demo_config.vocab_path
    logging.info('demo: writing a random CLIP to %s', clip_dir)
    write_random_clip(clip_dir, vocab_path=vocab or None, **dict(demo_config.clip))
  return DemoAssets(manual_dir=str(root / 'shapenet55'), data_dir=str(root / 'tfds'), clip_path=str(clip_dir))


def _write_slip(path: pathlib.Path, sizes) -> str:
  if not path.is_file():
    logging.info('demo: writing a random SLIP checkpoint to %s', path)
    write_random_slip(
      path,
      vision_width=sizes.vision_width,
      vision_layers=sizes.vision_layers,
      patch_size=sizes.patch_size,
      image_size=sizes.image_size,
      text_width=sizes.text_width,
      text_layers=sizes.text_layers,
      embed_dim=sizes.projection_dim,
      seed=sizes.seed,
    )
  return str(path)
