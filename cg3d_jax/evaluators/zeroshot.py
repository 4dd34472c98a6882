"""Zero-shot 3D classification: a text classifier from class names x templates, scored against a whole split.

The pieces, each usable alone:
  * `resolve_templates`: a named template set ('cg3d_zeroshot' = CG3D's single "This is a {}", 'ulip' = ULIP's 64)
    or a user's own list of templates with one `{}`;
  * `prompt_class_names`: class names as stored ('raw', what CG3D prompts with) or as words ('words': ULIP's
    ModelNet40 spellings such as "flower pot", otherwise underscores turned into spaces);
  * `encode_texts` / `text_classifier`: the frozen text tower over (template, class) captions, in fixed-size jitted
    chunks, then `metrics.zero_shot_classifier` (normalize_text=False reproduces the original CG3D quirk: its text
    features were never L2-normalised);
  * `split_point_features`: point features of every real example of an eval iterator, FPS to the encoder's input
    size on device, sharded over the mesh; rows of the padded last batch are dropped by its mask, never a real one;
  * `run_zero_shot` composes them into (N, C) scores and labels; `summarize` gives top-k and class-mean accuracy.

`ZeroShotEvaluator` is the evaluator (evaluators/evaluator.py) that the training loop validates with and the evaluate
command runs: built once (the frozen text tower's classifier included), then `run({'encoder', 'clip'})`.
"""

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax import sharding
from cg3d_jax.clip import templates as template_sets
from cg3d_jax.clip.loaded_clip import tokenize
from cg3d_jax.errors import ConfigError
from cg3d_jax.evaluators import evaluator, metrics
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.models.clip import CLIP
from cg3d_jax.models.point_ops import sample_points

TEXT_CHUNK = 256  # captions per text-tower call; the last chunk is padded so one compiled shape serves all
DEFAULT_KS = (1, 3, 5)


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  """A template set name (see cg3d_jax.clip.templates) or a sequence of templates, each with exactly one `{}`."""
  if isinstance(spec, str):
    return template_sets.get_templates(spec)
  spec = tuple(spec)
  if not spec:
    raise ValueError('templates: the list is empty; give a set name such as "cg3d_zeroshot" or templates with {}')
  for t in spec:
    if not isinstance(t, str) or t.count('{}') != 1:
      raise ValueError(f'template {t!r} must be a string with exactly one {{}} where the class name goes')
  return spec


NAME_STYLES = ('raw', 'words')


def prompt_class_names(class_names: Sequence[str], style: str = 'raw') -> list[str]:
  """The names put into the templates: 'raw' as the dataset stores them (CG3D), or 'words' (ULIP)."""
  class_names = list(class_names)
  if style == 'raw':
    return class_names
  if style != 'words':
    raise ValueError(f'class name style must be one of {NAME_STYLES}, got {style!r}')
  ulip = template_sets.ulip_modelnet40_names()
  if len(class_names) == len(ulip) and all(
    c.replace('_', ' ') == u or c == u.replace(' ', '_') for c, u in zip(class_names, ulip)
  ):
    return list(ulip)
  return [c.replace('_', ' ') for c in class_names]


def encode_texts(clip: CLIP, clip_params: dict, token_ids, chunk: int = TEXT_CHUNK) -> np.ndarray:
  """Raw (not normalised) text features for token ids (..., L) -> (..., D) float32, in jitted chunks."""
  token_ids = np.asarray(token_ids, np.int32)
  lead, length = token_ids.shape[:-1], token_ids.shape[-1]
  flat = token_ids.reshape(-1, length)
  if flat.shape[0] == 0:
    raise ValueError('encode_texts: no captions to encode')
  encode = jax.jit(lambda p, ids: clip.apply({'params': p}, ids, method=CLIP.encode_text).astype(jnp.float32))
  size = min(chunk, flat.shape[0])
  out = []
  for start in range(0, flat.shape[0], size):
    ids = flat[start : start + size]
    real = ids.shape[0]
    if real < size:  # pad with copies of a real caption: garbage-free and the same compiled shape
      ids = np.concatenate([ids, np.repeat(ids[:1], size - real, axis=0)])
    out.append(np.asarray(encode(clip_params, ids))[:real])
  return np.concatenate(out).reshape(*lead, -1)


def text_classifier(
  clip: CLIP,
  clip_params: dict,
  tokenizer,
  class_names: Sequence[str],
  templates: str | Sequence[str] = 'cg3d_zeroshot',
  *,
  normalize: bool = True,
  name_style: str = 'raw',
) -> np.ndarray:
  """(C, D) class weights from every (template, class) caption; see metrics.zero_shot_classifier for `normalize`."""
  texts = resolve_templates(templates)
  names = prompt_class_names(class_names, name_style)
  if not names:
    raise ValueError('text_classifier: no class names')
  ids = tokenize(tokenizer, [t.format(c) for t in texts for c in names]).reshape(len(texts), len(names), -1)
  return np.asarray(metrics.zero_shot_classifier(encode_texts(clip, clip_params, ids), normalize=normalize))


def point_feature_fn(model: CG3D, mesh: jax.sharding.Mesh):
  """jit of (encoder_vars, points (B, S, 3)) -> normalised features (B, D): FPS to N, encoder, L2; batch-sharded."""
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def features(encoder_vars, points):
    return model.point_features(encoder_vars, sample_points(points, model.num_points), train=False)[0]

  return jax.jit(features, in_shardings=(replicated, batch), out_shardings=batch), replicated


class PointEncoder:
  """Global batches (B, S, C) -> (B, D) normalised features (point_feature_fn), the encoder's variables placed on
  the mesh once; `batch_size` rounded up to whole rows per device, `sharding` the batches' own. Variables already
  on one host's device cannot be copied to other hosts' devices: give host (NumPy) values for a mesh over hosts."""

  def __init__(self, model: CG3D, encoder_vars: dict, mesh: jax.sharding.Mesh, batch_size: int = 1):
    self._features, replicated = point_feature_fn(model, mesh)
    self._vars = jax.device_put(encoder_vars, replicated)
    self.batch_size = -(-batch_size // mesh.size) * mesh.size
    self.sharding = sharding.batch_sharding(mesh)

  def __call__(self, points):
    return self._features(self._vars, points)


def split_point_features(
  model: CG3D, encoder_vars: dict, batches: Iterable[dict], mesh: jax.sharding.Mesh, extra_fn=None, extra_params=None
) -> dict[str, np.ndarray]:
  """Features of every real example of `batches` (global arrays from pipeline.make_eval_iterator), in order.

  Returns {'point_features': (N, D), 'label': (N,)} on the host, rows whose 'mask' is False removed. `extra_fn`
  (params, batch) -> {name: (B, ...) array}, jitted by the caller, adds per-example outputs (e.g. image features);
  `extra_params` are its first argument. Batches are dispatched before earlier results are fetched, so the input
  pipeline and the device overlap.
  """
  encode = PointEncoder(model, encoder_vars, mesh)
  pending = []
  for batch in batches:
    if 'mask' not in batch:
      raise ValueError("split_point_features: batches need a 'mask' (use pipeline.make_eval_iterator)")
    out = {'point_features': encode(batch['points']), 'label': batch['label'], 'mask': batch['mask']}
    if extra_fn is not None:
      out.update(extra_fn(extra_params, batch))
    pending.append(out)
  return evaluator.real_rows(pending)


@dataclasses.dataclass
class ZeroShotOutputs:
  scores: np.ndarray  # (N, C) cosine similarities (raw dot products against un-normalised text if the quirk is on)
  labels: np.ndarray  # (N,) int
  class_names: list[str]  # as the dataset stores them (reports use these)
  point_features: np.ndarray  # (N, D) L2-normalised
  classifier: np.ndarray  # (C, D)


def run_zero_shot(
  model: CG3D,
  encoder_vars: dict,
  clip_params: dict,
  tokenizer,
  batches: Iterable[dict],
  class_names: Sequence[str],
  mesh: jax.sharding.Mesh,
  *,
  templates: str | Sequence[str] = 'cg3d_zeroshot',
  normalize_text: bool = True,
  name_style: str = 'raw',
  classifier=None,
) -> ZeroShotOutputs:
  """Scores of every example of the split against every class.

  classifier: (C, D) class weights from `text_classifier`, to skip recomputing them (the text tower is frozen, so
  a training loop can build them once); when given, clip_params, tokenizer, templates, normalize_text and
  name_style are not used.
  """
  if classifier is None:
    classifier = text_classifier(
      model.clip, clip_params, tokenizer, class_names, templates, normalize=normalize_text, name_style=name_style
    )
  classifier = np.asarray(classifier)
  if classifier.shape[0] != len(class_names):
    raise ValueError(f'run_zero_shot: classifier has {classifier.shape[0]} rows for {len(class_names)} classes')
  split = split_point_features(model, encoder_vars, batches, mesh)
  scores = np.asarray(metrics.zero_shot_scores(split['point_features'], classifier))
  return ZeroShotOutputs(
    scores=scores,
    labels=split['label'].astype(np.int64),
    class_names=list(class_names),
    point_features=split['point_features'],
    classifier=classifier,
  )


def summarize(outputs: ZeroShotOutputs, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float | int]:
  """{'top1', 'top3', 'top5', 'class_mean'} as fractions and 'count', the number of examples scored."""
  topk = metrics.topk_accuracy(outputs.scores, outputs.labels, ks)
  summary = {f'top{k}': v for k, v in topk.items()}
  summary['class_mean'] = metrics.class_mean_accuracy(
    metrics.predictions(outputs.scores), outputs.labels, len(outputs.class_names)
  )
  summary['count'] = int(outputs.labels.shape[0])
  return summary


PROMPT_SETS = ('precomputed', 'names', 'templates', 'file')


def class_features_file(path, class_names: Sequence[str]) -> np.ndarray:
  """A user's class features (config.eval.class_features) in `class_names`' order, (C, D) float32: a .npz with
  `names` and `features` (rows matched by name), or a .npy (C, D) in that order. Read without pickles."""
  import os

  from cg3d_jax.errors import BadInputError

  if not os.path.isfile(path):
    raise ConfigError(f'config.eval.class_features={path!r}: no such file')
  try:
    loaded = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as err:
    raise BadInputError(path, f'not a readable .npy / .npz of class features ({err})') from None
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      if 'names' not in loaded or 'features' not in loaded:
        raise BadInputError(path, f"a .npz of class features holds 'names' and 'features'; found {loaded.files}")
      names, features = [str(n) for n in loaded['names']], np.asarray(loaded['features'])
    if features.ndim != 2 or len(names) != features.shape[0]:
      raise BadInputError(path, f'{len(names)} names but features of shape {features.shape}; expected (names, dim)')
    missing = [c for c in class_names if c not in names]
    if missing:
      raise BadInputError(path, f'no features for {len(missing)} class(es) of the split, e.g. {missing[:5]}')
    features = features[[names.index(c) for c in class_names]]
  else:
    features = np.asarray(loaded)
    if features.ndim != 2 or features.shape[0] != len(class_names):
      raise BadInputError(
        path, f'features of shape {features.shape}; expected ({len(class_names)}, dim): one row per class of the split'
      )
  if not np.issubdtype(features.dtype, np.floating) or not np.all(np.isfinite(features)):
    raise BadInputError(path, 'class features must be finite floating-point numbers')
  return features.astype(np.float32)


def class_weights(data, ev, model=None, clip_params=None, tokenizer=None) -> np.ndarray:
  """(C, D) class weights of `data` (anything with class_names, class_features and source, e.g. a data source's
  EvalData) from the prompt set config.eval.prompts names:
    'precomputed'  the layout's stored class-name text features (OpenShape's *cat_name_pt_feat.npy: OpenCLIP
                   ViT-bigG-14 over its prompt engineering); no CLIP needed;
    'names'        the bare class names through the CLIP text tower (template '{}');
    'templates'    config.eval.templates over the names (config.eval.name_style, config.eval.normalize_text);
    'file'         config.eval.class_features, a user's file (class_features_file); no CLIP needed."""
  prompts = ev.prompts
  if prompts not in PROMPT_SETS:
    raise ConfigError(f'config.eval.prompts={prompts!r}: expected one of {PROMPT_SETS}')
  if prompts == 'precomputed':
    if data.class_features is None:
      raise ConfigError(
        f'{data.source} stores no class-name features (Uni3D prompts its CLIP): use '
        '--config.eval.prompts=templates (or names) with --config.clip.path=<the CLIP of the features>'
      )
    return np.asarray(metrics.zero_shot_classifier(data.class_features))
  if prompts == 'file':
    features = class_features_file(ev.class_features, data.class_names)
    width = None if model is None else getattr(model.encoder, 'projection_dim', None) or model.encoder.embed_dim
    if width is not None and features.shape[1] != width:
      raise ConfigError(
        f'config.eval.class_features={ev.class_features!r} holds {features.shape[1]}-dimensional features but the '
        f'encoder projects to {width}: not the joint space it was trained in'
      )
    return np.asarray(metrics.zero_shot_classifier(features))
  if model is None or model.clip is None:
    raise ConfigError(
      f'config.eval.prompts={prompts!r} runs a CLIP text tower: give the CLIP the features came from '
      'with --config.clip.path'
    )
  templates = ('{}',) if prompts == 'names' else ev.templates
  return text_classifier(
    model.clip,
    clip_params,
    tokenizer,
    data.class_names,
    templates,
    normalize=ev.normalize_text,
    name_style=ev.name_style,
  )


def needs_clip(ev) -> bool:
  """Whether config.eval's prompts run a CLIP text tower (precomputed class features do not)."""
  return ev.prompts not in ('precomputed', 'file')


def prompt_record(ev) -> dict:
  """What the class weights were computed with, for results.json: 'protocol' is 'cg3d_original' for the original
  eval.py's settings (one template, raw names, unnormalised text), else 'cosine', 'unnormalised' or 'precomputed';
  'class_features' where they came from: the user's file, 'the layout' (its stored features) or 'the text tower'."""
  prompts = ev.prompts
  if prompts in ('precomputed', 'file'):
    record = {'prompts': prompts, 'templates': None, 'name_style': None, 'normalize_text': None}
    source = {'class_features': ev.class_features} if prompts == 'file' else {'class_features': 'the layout'}
    return {**record, 'protocol': 'precomputed', **source}
  templates = ev.templates if prompts == 'templates' else None
  name_style, normalize = ev.name_style, ev.normalize_text
  original = templates == 'cg3d_zeroshot' and name_style == 'raw' and not normalize
  return {
    'prompts': prompts,
    'class_features': 'the text tower',
    'templates': templates,
    'name_style': name_style,
    'normalize_text': normalize,
    'protocol': 'cg3d_original' if original else ('cosine' if normalize else 'unnormalised'),
  }


class ZeroShotEvaluator:
  """Zero-shot top-k and class-mean accuracy of a CG3D model on one split (evaluators/evaluator.py's interface).

  The class weights come from the frozen, prompt-less text tower, so they are built once here (or are given:
  `classifier` (C, D), e.g. a layout's precomputed class-name features, and then no CLIP is needed); `run` embeds the
  split's clouds with the given encoder variables. `batches` makes a fresh pass over the split each call (global
  batches with a 'mask', e.g. a partial of pipeline.make_eval_iterator).
  """

  def __init__(
    self,
    model: CG3D,
    clip_params: dict,
    tokenizer,
    *,
    batches: Callable[[], Iterable[dict]],
    class_names: Sequence[str],
    mesh: jax.sharding.Mesh,
    templates: str | Sequence[str] = 'cg3d_zeroshot',
    normalize_text: bool = True,
    name_style: str = 'raw',
    ks: Sequence[int] = DEFAULT_KS,
    prefix: str = 'val/',
    classifier=None,
  ):
    self.model, self.mesh, self.batches, self.prefix = model, mesh, batches, prefix
    self.class_names, self.ks = list(class_names), tuple(ks)
    if classifier is None:
      classifier = text_classifier(
        model.clip, clip_params, tokenizer, class_names, templates, normalize=normalize_text, name_style=name_style
      )
    self.classifier = np.asarray(classifier)

  def outputs(self, variables: dict) -> ZeroShotOutputs:
    return run_zero_shot(
      self.model,
      variables['encoder'],
      variables['clip'],
      None,
      self.batches(),
      self.class_names,
      self.mesh,
      classifier=self.classifier,
    )

  def run(self, variables: dict) -> dict[str, float]:
    return {self.prefix + k: v for k, v in summarize(self.outputs(variables), self.ks).items()}

  def report(self, variables: dict, workdir: str, dataset: str, info: dict) -> dict:
    """Scores the split and writes results.json, per_class.csv/json and confusion.png into `workdir` (process 0)
    and prints the table; returns the summary (empty on other processes)."""
    from cg3d_jax.evaluators import reports  # matplotlib: when a report is written, not at every validation

    outputs = self.outputs(variables)
    if jax.process_index() != 0:
      return {}
    summary = reports.write_classification_report(
      workdir,
      dataset=dataset,
      class_names=self.class_names,
      logits=outputs.scores,
      labels=outputs.labels,
      ks=self.ks,
      extra=info,
    )
    columns = ['dataset', 'num_objects', *(f'top{k}_acc' for k in self.ks), 'class_mean_acc', 'prompts']
    print(reports.format_table([summary], columns))
    written = (reports.RESULTS_FILE, reports.PER_CLASS_CSV, reports.PER_CLASS_JSON, reports.CONFUSION_PNG)
    print(f'wrote {", ".join(written)} to {workdir}')
    return summary
