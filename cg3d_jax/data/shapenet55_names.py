"""ShapeNet-55's class names as CG3D uses them: the synset dictionary, CG3D's renames and the label order.

File knowledge only (no TensorFlow), so that scene queries read it without the TFDS builder (data/shapenet55.py).
"""

import json
import pathlib

from cg3d_jax import assets
from cg3d_jax.data.formats import readers

CG3D_RENAMES = {'display': 'monitor', 'vessel': 'ship', 'ashcan': 'trashcan'}


def class_name_of(synset_name: str) -> str:
  first = synset_name.split(',')[0].strip()
  return CG3D_RENAMES.get(first, first)


def read_synset_dictionary(path: pathlib.Path | None) -> dict[str, str]:
  """synset id -> class name, from ShapeNet's taxonomy.json at `path` (list or dict form), or the package copy."""
  if path is None:
    raw = json.loads(assets.read_text('shapenet55_synsets.json'))
  else:
    try:
      raw = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
      raise readers.BadInputError(f'{path}: not a readable JSON synset dictionary ({e})') from e
    if isinstance(raw, list):
      try:
        raw = {entry['synsetId']: entry['name'] for entry in raw}
      except (TypeError, KeyError) as e:
        raise readers.BadInputError(f'{path}: expected a list of {{"synsetId": ..., "name": ...}} entries') from e
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
      raise readers.BadInputError(f'{path}: expected a synset dictionary {{synset id: name}}')
  return {synset: class_name_of(name) for synset, name in raw.items()}


def read_shape_names(path: pathlib.Path | None) -> list[str]:
  if path is None:
    return [line.strip() for line in assets.read_text('shapenet55_shape_names.txt').splitlines() if line.strip()]
  names = [text for _, text in readers.read_lines(path)]
  if len(set(names)) != len(names):
    raise readers.BadInputError(f'{path}: class names must be unique')
  return names
