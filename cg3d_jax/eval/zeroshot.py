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

`zero_shot_eval` is the one call the training loop's validation needs; `load_eval_model` turns a checkpoint into
what the evaluate and predict commands score.
"""

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cg3d_jax.data import templates as template_sets
from cg3d_jax.eval import metrics
from cg3d_jax.models.cg3d import CG3D, sample_points
from cg3d_jax.models.clip import CLIP
from cg3d_jax.train import sharding
from cg3d_jax.train.trained import load_trained
from cg3d_jax.weights.hf_clip import LoadedCLIP, load_clip, tokenize

TEXT_CHUNK = 256  # captions per text-tower call; the last chunk is padded so one compiled shape serves all
DEFAULT_KS = (1, 3, 5)


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  """A template set name (see cg3d_jax.data.templates) or a sequence of templates, each with exactly one `{}`."""
  if isinstance(spec, str):
    return template_sets.get_templates(spec)
  spec = tuple(spec)
  if not spec:
    raise ValueError('templates: the list is empty; give a set name such as "cg3d_zeroshot" or templates with {}')
  for t in spec:
    if not isinstance(t, str) or t.count('{}') != 1:
      raise ValueError(f'template {t!r} must be a string with exactly one {{}} where the class name goes')
  return spec


def prompt_class_names(class_names: Sequence[str], style: str = 'raw') -> list[str]:
  """The names put into the templates: 'raw' as the dataset stores them (CG3D), or 'words' (ULIP)."""
  class_names = list(class_names)
  if style == 'raw':
    return class_names
  if style != 'words':
    raise ValueError(f"class name style must be 'raw' or 'words', got {style!r}")
  ulip = template_sets.ulip_modelnet40_names()
  if len(class_names) == len(ulip) and all(c.replace('_', ' ') == u or c == u.replace(' ', '_')
                                           for c, u in zip(class_names, ulip)):
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
    ids = flat[start:start + size]
    real = ids.shape[0]
    if real < size:  # pad with copies of a real caption: garbage-free and the same compiled shape
      ids = np.concatenate([ids, np.repeat(ids[:1], size - real, axis=0)])
    out.append(np.asarray(encode(clip_params, ids))[:real])
  return np.concatenate(out).reshape(*lead, -1)


def text_classifier(clip: CLIP, clip_params: dict, tokenizer, class_names: Sequence[str],
                    templates: str | Sequence[str] = 'cg3d_zeroshot', *, normalize: bool = True,
                    name_style: str = 'raw') -> np.ndarray:
  """(C, D) class weights from every (template, class) caption; see metrics.zero_shot_classifier for `normalize`."""
  texts = resolve_templates(templates)
  names = prompt_class_names(class_names, name_style)
  if not names:
    raise ValueError('text_classifier: no class names')
  ids = tokenize(tokenizer, [t.format(c) for t in texts for c in names]).reshape(len(texts), len(names), -1)
  return np.asarray(metrics.zero_shot_classifier(encode_texts(clip, clip_params, ids), normalize=normalize))


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def point_feature_fn(model: CG3D, mesh: jax.sharding.Mesh):
  """jit of (encoder_vars, points (B, S, 3)) -> normalised features (B, D): FPS to N, encoder, L2; batch-sharded."""
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def features(encoder_vars, points):
    return model.point_features(encoder_vars, sample_points(points, model.num_points), train=False)[0]

  return jax.jit(features, in_shardings=(replicated, batch), out_shardings=batch), replicated


def split_point_features(model: CG3D, encoder_vars: dict, batches: Iterable[dict], mesh: jax.sharding.Mesh,
                         extra_fn=None, extra_params=None) -> dict[str, np.ndarray]:
  """Features of every real example of `batches` (global arrays from pipeline.make_eval_iterator), in order.

  Returns {'point_features': (N, D), 'label': (N,)} on the host, rows whose 'mask' is False removed. `extra_fn`
  (params, batch) -> {name: (B, ...) array}, jitted by the caller, adds per-example outputs (e.g. image features);
  `extra_params` are its first argument. Batches are dispatched before earlier results are fetched, so the input
  pipeline and the device overlap.
  """
  features_fn, replicated = point_feature_fn(model, mesh)
  encoder_vars = jax.device_put(encoder_vars, replicated)
  pending = []
  for batch in batches:
    if 'mask' not in batch:
      raise ValueError("split_point_features: batches need a 'mask' (use pipeline.make_eval_iterator)")
    out = {'point_features': features_fn(encoder_vars, batch['points']), 'label': batch['label'],
           'mask': batch['mask']}
    if extra_fn is not None:
      out.update(extra_fn(extra_params, batch))
    pending.append(out)
  if not pending:
    raise ValueError('split_point_features: the eval iterator yielded no batches (empty split?)')
  host = [{k: _to_host(v) for k, v in out.items()} for out in pending]
  masks = [h.pop('mask').astype(bool) for h in host]
  result = {k: np.concatenate([h[k][m] for h, m in zip(host, masks)]) for k in host[0]}
  if result['label'].shape[0] == 0:
    raise ValueError('split_point_features: every row was padding; the split has no examples')
  return result


@dataclasses.dataclass
class ZeroShotOutputs:
  scores: np.ndarray  # (N, C) cosine similarities (raw dot products against un-normalised text if the quirk is on)
  labels: np.ndarray  # (N,) int
  class_names: list[str]  # as the dataset stores them (reports use these)
  point_features: np.ndarray  # (N, D) L2-normalised
  classifier: np.ndarray  # (C, D)


def run_zero_shot(model: CG3D, encoder_vars: dict, clip_params: dict, tokenizer, batches: Iterable[dict],
                  class_names: Sequence[str], mesh: jax.sharding.Mesh, *,
                  templates: str | Sequence[str] = 'cg3d_zeroshot', normalize_text: bool = True,
                  name_style: str = 'raw', classifier=None) -> ZeroShotOutputs:
  """Scores of every example of the split against every class.

  classifier: (C, D) class weights from `text_classifier`, to skip recomputing them (the text tower is frozen, so
  a training loop can build them once); when given, clip_params, tokenizer, templates, normalize_text and
  name_style are not used.
  """
  if classifier is None:
    classifier = text_classifier(model.clip, clip_params, tokenizer, class_names, templates,
                                 normalize=normalize_text, name_style=name_style)
  classifier = np.asarray(classifier)
  if classifier.shape[0] != len(class_names):
    raise ValueError(f'run_zero_shot: classifier has {classifier.shape[0]} rows for {len(class_names)} classes')
  split = split_point_features(model, encoder_vars, batches, mesh)
  scores = np.asarray(metrics.zero_shot_scores(split['point_features'], classifier))
  return ZeroShotOutputs(scores=scores, labels=split['label'].astype(np.int64), class_names=list(class_names),
                         point_features=split['point_features'], classifier=classifier)


def summarize(outputs: ZeroShotOutputs, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float | int]:
  """{'top1', 'top3', 'top5', 'class_mean'} as fractions and 'count', the number of examples scored."""
  topk = metrics.topk_accuracy(outputs.scores, outputs.labels, ks)
  summary = {f'top{k}': v for k, v in topk.items()}
  summary['class_mean'] = metrics.class_mean_accuracy(metrics.predictions(outputs.scores), outputs.labels,
                                                      len(outputs.class_names))
  summary['count'] = int(outputs.labels.shape[0])
  return summary


def zero_shot_eval(model: CG3D, encoder_vars: dict, clip_params: dict, tokenizer, batches: Iterable[dict],
                   class_names: Sequence[str], mesh: jax.sharding.Mesh, *,
                   templates: str | Sequence[str] = 'cg3d_zeroshot', normalize_text: bool = True,
                   name_style: str = 'raw', classifier=None, prefix: str = 'val/') -> dict[str, float | int]:
  """Validation metrics for the training loop: {prefix + 'top1', 'top3', 'top5', 'class_mean', 'count'}."""
  outputs = run_zero_shot(model, encoder_vars, clip_params, tokenizer, batches, class_names, mesh,
                          templates=templates, normalize_text=normalize_text, name_style=name_style,
                          classifier=classifier)
  return {prefix + k: v for k, v in summarize(outputs).items()}


@dataclasses.dataclass
class EvalModel:
  """A checkpoint ready to score: the composite model, its encoder variables and CLIP with the trained prompts."""
  model: CG3D
  encoder_vars: dict
  clip: LoadedCLIP  # clip.params['prompts'] holds the trained prompts (when the model has any)
  config: ml_collections.ConfigDict  # the config the checkpoint was trained with
  step: int
  source: str

  @property
  def clip_params(self) -> dict:
    return self.clip.params


TORCH_SUFFIXES = ('.pth', '.safetensors')


def load_eval_model(checkpoint, *, clip_path: str | None = None, step: int | None = None,
                    num_points: int = 1024) -> EvalModel:
  """A training workdir / step folder, or an original CG3D (or exported) .pth / .safetensors -> EvalModel.

  clip_path overrides the CLIP folder recorded in the checkpoint's config (e.g. the run was trained elsewhere); an
  original .pth records none, so it is required there. num_points is the encoder's input size for a .pth that
  does not record its config (the original's 1024 by default); training checkpoints always record theirs.
  """
  if str(checkpoint).endswith(TORCH_SUFFIXES):
    return _load_torch_checkpoint(checkpoint, clip_path, num_points)
  trained = load_trained(checkpoint, step)
  config = trained.config
  path = clip_path or config.clip.get('path')
  if not path:
    raise ValueError(f'{trained.path}: its config has no clip.path; pass the CLIP folder it was trained with')
  clip = load_clip(path, prompt_mode=config.clip.prompt.mode, num_prompts=config.clip.prompt.num_tokens,
                   dtype=jnp.dtype(config.clip.dtype), seed=config.seed)
  _set_prompts(clip, trained.prompts, trained.path, path, config.clip.prompt.mode)
  _check_joint_space(config.model.embed_dim, clip, trained.path, path)
  model = CG3D(encoder=trained.encoder, clip=clip.model, num_points=config.model.num_points)
  return EvalModel(model=model, encoder_vars=trained.encoder_vars, clip=clip, config=config, step=trained.step,
                   source=str(trained.path))


def _set_prompts(clip: LoadedCLIP, prompts, source, clip_path, prompt_mode: str) -> None:
  expected = None if 'prompts' not in clip.params else tuple(clip.params['prompts']['tokens'].shape)
  found = None if prompts is None else tuple(prompts.shape)
  if expected != found:
    raise ValueError(f'{source}: trained prompts have shape {found} but the CLIP at {clip_path} with prompt mode '
                     f'{prompt_mode!r} expects {expected}: is this the CLIP it was trained with?')
  if found is not None:
    clip.params['prompts'] = {'tokens': jnp.asarray(prompts)}


def _check_joint_space(embed_dim: int, clip: LoadedCLIP, source, clip_path) -> None:
  if embed_dim != clip.spec.projection_dim:
    raise ValueError(f'{source}: the encoder projects to {embed_dim} but the CLIP at {clip_path} to '
                     f'{clip.spec.projection_dim}')


def _load_torch_checkpoint(path, clip_path, num_points):
  """An original CG3D / exported container: encoder and prompts from the file, frozen CLIP from clip_path."""
  from cg3d_jax.weights.cg3d_checkpoint import load_cg3d_checkpoint  # torch only on this path
  encoder_name, params, batch_stats, prompts, info = load_cg3d_checkpoint(path)
  saved = info['config'] or {}
  num_points = int(saved.get('model', {}).get('num_points', num_points))
  clip_path = clip_path or saved.get('clip', {}).get('path')
  if not clip_path:
    raise ValueError(f'{path}: an original CG3D checkpoint does not say which CLIP it was trained with; give the '
                     'local transformers CLIP folder with --config.clip.path=...')
  num_prompts = 5 if prompts is None else int(prompts.shape[1])
  clip = load_clip(clip_path, prompt_mode=info['prompt_mode'], num_prompts=num_prompts)
  _set_prompts(clip, prompts, path, clip_path, info['prompt_mode'])
  encoder = info['model']
  # PointMLP names its joint-space width projection_dim (its embed_dim is the first stage's width).
  _check_joint_space(getattr(encoder, 'projection_dim', None) or encoder.embed_dim, clip, path, clip_path)
  config = ml_collections.ConfigDict(saved) if saved else ml_collections.ConfigDict(
      {'model': {'encoder': encoder_name, 'num_points': num_points},
       'clip': {'path': clip_path, 'prompt': {'mode': info['prompt_mode'], 'num_tokens': num_prompts}}})
  step = info['step'] if isinstance(info['step'], int) else max(info['epoch'], 0)
  return EvalModel(model=CG3D(encoder=encoder, clip=clip.model, num_points=num_points),
                   encoder_vars={'params': params, 'batch_stats': batch_stats}, clip=clip, config=config, step=step,
                   source=str(path))
