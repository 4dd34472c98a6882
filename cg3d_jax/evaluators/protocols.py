"""The zero-shot protocol each released family published, applied by default when its file is evaluated.

Read at the source (salesforce/ULIP main.py test_zeroshot_3d_core and data/dataset_3d.py; Colin97/OpenShape_code
src/main.py and data; baaivision/Uni3D main.py and data/datasets.py):

  ULIP, ULIP-2  the 64 templates of ULIP's templates.json ('modelnet40_64') over labels.json's names (ModelNet40 as
                words: "flower pot"), each template's text feature normalised, averaged, normalised again; the clouds
                as stored (no axis swap, centred on the mean, unit sphere); ULIP-2's colour from the file, grey 0.4
                where the set has none; 8,192 points (ULIP) or 10,000 (ULIP-2).
  OpenShape     the layout's precomputed OpenCLIP ViT-bigG-14 class-name features (cat_name_pt_feat.npy), y and z
                swapped (the layouts store y-up, OpenShape's encoder sees z-up), colour from the file or grey 0.4,
                10,000 points.
  Uni3D         ULIP's 64 templates through EVA02-E-14-plus's text tower (which this package cannot run: its class
                features come from the user's file, config.eval.class_features), the stored axes (Uni3D's
                openshape_setting is off by default), colour from the file or grey 0.4, 10,000 points.

A CG3D checkpoint's protocol is the config's own (CG3D's template, or what the zero-shot config's arg says).
`config.eval.protocol='config'` scores any file with the config's settings instead; what was used is recorded in
results.json either way (`published_protocol`, `class_features`).
"""

import dataclasses

from cg3d_jax.errors import ConfigError

PROTOCOLS = ('published', 'config')  # config.eval.protocol


@dataclasses.dataclass(frozen=True)
class Protocol:
  family: str  # the released family (trained.TrainedModel.config.released)
  prompts: str  # how the class weights are made (evaluators/zeroshot.class_weights)
  y_up: bool  # swap y and z (the sets store y-up; OpenShape's encoder sees z-up)
  templates: str | None = None  # the template set, with prompts='templates'
  name_style: str | None = None
  text_tower: str | None = None  # what the class features must come from, for the messages

  def settings(self, ev, channels: int) -> dict:
    """The config.eval fields this protocol sets for an encoder taking `channels` per point."""
    out = {'y_up': self.y_up, 'use_color': channels == 6}
    if ev.get('class_features'):  # the user's own features are an explicit choice: scored as given
      return {**out, 'prompts': 'file'}
    out['prompts'] = self.prompts
    if self.prompts == 'templates':
      out.update(templates=self.templates, name_style=self.name_style, normalize_text=True)
    return out


PUBLISHED = {
  'ULIP': Protocol('ULIP', 'templates', y_up=False, templates='ulip', name_style='words'),
  'OpenShape': Protocol('OpenShape', 'precomputed', y_up=True, text_tower='OpenCLIP ViT-bigG-14'),
  'Uni3D': Protocol('Uni3D', 'file', y_up=False, text_tower="EVA02-E-14-plus over ULIP's 64 templates"),
}


def _choice(ev) -> str:
  choice = ev.get('protocol', 'published')
  if choice not in PROTOCOLS:
    raise ConfigError(f'config.eval.protocol={choice!r}: expected one of {PROTOCOLS}')
  return choice


def for_evaluation(ev, released: str | None, channels: int, *, has_clip: bool, layout_features: bool):
  """(config.eval with the protocol applied, its record for results.json). `released`: the checkpoint's family
  (None for CG3D's own checkpoints: the config is its protocol); `has_clip`: a text tower is at hand (config.clip.path
  or the file's own towers); `layout_features`: the set stores precomputed class features."""
  choice = _choice(ev)
  if released is None or choice == 'config':
    return ev, {'published_protocol': None}
  protocol = PUBLISHED[released]
  settings = protocol.settings(ev, channels)
  prompts = settings['prompts']
  instead = "; or --config.eval.protocol=config to score with the config's own settings"
  if prompts == 'file' and not ev.get('class_features'):
    raise ConfigError(
      f"{released}'s published protocol scores with class features of {protocol.text_tower}, which this package "
      'cannot compute: give them with --config.eval.class_features=FILE (.npz of names and features, or .npy in the '
      f"split's class order){instead}"
    )
  if prompts == 'precomputed' and not layout_features:
    raise ConfigError(
      f"{released}'s published protocol scores with the layout's precomputed {protocol.text_tower} class features, "
      "which this set does not store: give them with --config.eval.class_features=FILE (e.g. OpenShape's "
      f'cat_name_pt_feat.npy of the same classes){instead}'
    )
  if prompts == 'templates' and not has_clip:
    raise ConfigError(
      f"{released}'s published protocol runs its CLIP's text tower over ULIP's 64 templates: give that CLIP with "
      f'--config.clip.path, or its class features with --config.eval.class_features=FILE{instead}'
    )
  applied = ev.copy_and_resolve_references()
  with applied.unlocked():
    for key, value in settings.items():
      applied[key] = value
  return applied, {'published_protocol': {'family': released, **settings}}


def sees_z_up(released: str | None) -> bool:
  """Whether the family's encoder takes clouds with y and z swapped from how shapes are stored (OpenShape's)."""
  return released in PUBLISHED and PUBLISHED[released].y_up


def for_embedding(ev, released: str | None, channels: int):
  """A copy of config.eval that feeds the split as the encoder takes it: its channels (a coloured encoder gets the
  set's colours or grey 0.4) and, for a released family under the published protocol, its axes. No class weights are
  made, so nothing of the protocol's text side is needed."""
  choice = _choice(ev)
  applied = ev.copy_and_resolve_references()
  with applied.unlocked():
    applied.use_color = channels == 6
    if released is not None and choice == 'published':
      applied.y_up = PUBLISHED[released].y_up
  return applied
