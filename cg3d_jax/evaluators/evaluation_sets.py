"""Zero-shot sets in OpenShape's and Uni3D's layouts as `config.eval` names them, and the class weights of each
prompt set: Objaverse-LVIS (OpenShape's lvis.json or Uni3D's lvis_testset.txt), OpenShape's ModelNet40 and
ScanObjectNN files.

Prompt sets (`config.eval.prompts`), recorded beside every result:
  'precomputed'  the layout's stored class-name text features (OpenShape's lvis_cat_name_pt_feat.npy and
                 cat_name_pt_feat.npy: OpenCLIP ViT-bigG-14 over OpenShape's prompt engineering); no CLIP is loaded;
  'names'        the bare class names through the run's CLIP text tower (template '{}');
  'templates'    `config.eval.templates` (default 'ulip': the 64 `modelnet40_64` templates Uni3D and ULIP-2 average)
                 over the names, through the run's CLIP text tower.
Accuracy is per sample (top-1/3/5 over every example), with the class mean beside it, as OpenShape and Uni3D report.
"""

import os

import numpy as np

from cg3d_jax.data import host_batches, openshape_eval, openshape_stream
from cg3d_jax.errors import ConfigError
from cg3d_jax.evaluators import metrics
from cg3d_jax.evaluators.zeroshot import text_classifier

SETS = ('objaverse_lvis', 'modelnet40_openshape', 'scanobjectnn_openshape')
LAYOUTS = ('openshape', 'uni3d')
PROMPT_SETS = ('precomputed', 'names', 'templates')


def is_layout_set(name: str) -> bool:
  return name in SETS


def open_eval_set(ev, default_root=None) -> openshape_eval.EvalSet:
  """The EvalSet config.eval names (dataset, layout, manual_dir, list_file); `default_root`: the training data's."""
  root = ev.get('manual_dir') or default_root
  if not root:
    raise ConfigError(
      f'config.eval.manual_dir is not set: give the folder that holds the {ev.dataset} files '
      '(OpenShape: the folder with meta_data/; Uni3D: the objaverse_lvis folder)'
    )
  root = os.path.expanduser(root)
  if ev.dataset == 'objaverse_lvis':
    layout = ev.get('layout', 'openshape')
    if layout == 'openshape':
      return openshape_eval.lvis_openshape(root)
    if layout == 'uni3d':
      return openshape_eval.lvis_uni3d(ev.get('list_file') or os.path.join(root, 'lvis_testset.txt'), root)
    raise ConfigError(f'config.eval.layout={layout!r}: expected one of {LAYOUTS}')
  if ev.dataset == 'modelnet40_openshape':
    return openshape_eval.modelnet40_openshape(root)
  if ev.dataset == 'scanobjectnn_openshape':
    return openshape_eval.scanobjectnn_openshape(root)
  raise ConfigError(f'config.eval.dataset={ev.dataset!r}: expected one of {SETS}')


def classifier(evalset: openshape_eval.EvalSet, ev, model=None, clip_params=None, tokenizer=None) -> np.ndarray:
  """(C, D) class weights from the prompt set config.eval.prompts names (the CLIP is needed for names/templates)."""
  prompts = ev.get('prompts', 'precomputed')
  if prompts not in PROMPT_SETS:
    raise ConfigError(f'config.eval.prompts={prompts!r}: expected one of {PROMPT_SETS}')
  if prompts == 'precomputed':
    if evalset.class_features is None:
      raise ConfigError(
        f'{evalset.source} stores no class-name features (Uni3D prompts its CLIP): use '
        '--config.eval.prompts=templates (or names) with --config.clip.path=<the CLIP of the features>'
      )
    return np.asarray(metrics.zero_shot_classifier(evalset.class_features))
  if model is None or model.clip is None:
    raise ConfigError(
      f'config.eval.prompts={prompts!r} runs a CLIP text tower: give the CLIP the features came from '
      'with --config.clip.path'
    )
  templates = ('{}',) if prompts == 'names' else ev.templates
  return text_classifier(
    model.clip, clip_params, tokenizer, evalset.class_names, templates, name_style=ev.get('name_style', 'raw')
  )


def prompt_record(evalset: openshape_eval.EvalSet, ev) -> dict:
  """What the scores were computed with, for results.json."""
  prompts = ev.get('prompts', 'precomputed')
  return {
    'prompts': prompts,
    'templates': ev.templates if prompts == 'templates' else None,
    'name_style': ev.get('name_style', 'raw') if prompts != 'precomputed' else None,
    'layout': ev.get('layout', 'openshape') if ev.dataset == 'objaverse_lvis' else 'openshape',
    'y_up_swapped': evalset.y_up if ev.get('y_up') is None else bool(ev.y_up),
    'use_color': ev.use_color,
    'num_stored_points': ev.num_stored_points,
    'source': evalset.source,
  }


def eval_iterator(evalset: openshape_eval.EvalSet, ev, sharding, seed: int = 0):
  """One pass over the set as global batches ('points', 'label', 'mask')."""
  return host_batches.to_global(
    openshape_stream.eval_local_batches(
      evalset,
      batch_size=ev.batch_size,
      num_points=ev.num_stored_points,
      use_color=ev.use_color,
      y_up=ev.get('y_up'),
      seed=seed,
      max_examples=ev.get('max_examples'),
    ),
    sharding,
  )
