"""Caption and prompt templates, read from the package's own copy of the JSON files (no network, no repo paths).

Sets, by name:
  'cg3d'           CG3D's 63 pre-training caption templates (one is drawn per training sample);
  'cg3d_zeroshot'  CG3D's single zero-shot template, "This is a {category}";
  'ulip'           ULIP's 64 templates for ModelNet40 (a prompt ensemble for zero-shot);
  'ulip_shapenet'  ULIP's 64 templates for ShapeNet.
Every template is returned with one `{}` placeholder for the class name, so `template.format(name)` fills it.
"""

import functools
import json

from cg3d_jax import assets

_SETS = {
  'cg3d': ('cg3d_templates.json', 'cg3d_pretrain_captions'),
  'cg3d_zeroshot': ('cg3d_templates.json', 'cg3d_zero_shot'),
  'ulip': ('ulip_templates.json', 'modelnet40_64'),
  'ulip_shapenet': ('ulip_templates.json', 'shapenet_64'),
}


@functools.cache
def _load_json(name: str):
  return json.loads(assets.read_text(name))


def template_set_names() -> list[str]:
  return sorted(_SETS)


def get_templates(name: str) -> tuple[str, ...]:
  """The templates of set `name`, each with a single `{}` where the class name goes."""
  if name not in _SETS:
    raise ValueError(f'unknown template set {name!r}; expected one of {template_set_names()}')
  file_name, key = _SETS[name]
  # CG3D writes `{category}`, ULIP a bare `{}`; one placeholder spelling keeps callers simple.
  templates = tuple(t.replace('{category}', '{}') for t in _load_json(file_name)[key])
  for t in templates:
    if t.count('{}') != 1:
      raise ValueError(f'template {t!r} in assets/{file_name}[{key!r}] must hold exactly one class placeholder')
  return templates


def fill(template: str, class_name: str) -> str:
  return template.format(class_name)


def ulip_modelnet40_names() -> tuple[str, ...]:
  """ModelNet40 class names written as words ("flower pot" for flower_pot), in label order, as ULIP prompts them."""
  return tuple(_load_json('ulip_labels.json')['modelnet40'])
