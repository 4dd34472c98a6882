"""Trained models as the downstream commands use them: one small value per kind, whatever file they came from.

  TrainedModel  a pretrained point encoder and the prompts it trained, from a training run (checkpoints.read_step)
                or an original / exported `.pth` / `.safetensors` (weights.cg3d_pth); `load_trained(path)`.
  ScoringModel  a TrainedModel beside its frozen CLIP with the trained prompts in place: what zero-shot evaluation,
                retrieval, predict and scene queries score with; `with_clip(trained, clip_path)`.
  Finetuned     a fine-tuned classifier from a fine-tuning run; `load_finetuned(path)`.

Only the foreign formats are read in weights/; this module composes them with the project's own checkpoints.
"""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cg3d_jax import checkpoints, trees
from cg3d_jax.clip.loaded_clip import LoadedCLIP, load_clip
from cg3d_jax.errors import ConfigError, InputError
from cg3d_jax.models.cg3d import CG3D, build_encoder
from cg3d_jax.models.classifiers import build_classifier
from cg3d_jax.models.point_transformer import PointTransformer

TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')
# Label probabilities without a CLIP at hand (label features from a file): CLIP's trained temperature, exp(4.6052).
RELEASED_LOGIT_SCALE = 100.0


@dataclasses.dataclass
class TrainedModel:
  """A pretrained point encoder and the visual prompts trained with it."""

  encoder: nn.Module
  encoder_vars: dict  # {'params': ..., 'batch_stats': ...}
  prompts: np.ndarray | None  # (layers or 1, tokens, width); None when the run trained no prompts
  prompt_mode: str  # 'deep', 'shallow' or 'none'
  config: ml_collections.ConfigDict  # the run's config (for a .pth without one: the few fields it implies)
  step: int
  source: str  # what was read
  metrics: dict | None = None  # validation metrics saved with the step
  frozen_visual: dict | None = None  # an original .pth's frozen SLIP image tower (timm names), checked against the CLIP

  @property
  def encoder_name(self) -> str:
    return self.config.model.encoder

  @property
  def num_points(self) -> int:
    return int(self.config.model.num_points)

  @property
  def embed_dim(self) -> int:
    # PointMLP names its joint-space width projection_dim (its embed_dim is the first stage's width).
    return int(getattr(self.encoder, 'projection_dim', None) or self.encoder.embed_dim)

  @property
  def released(self) -> str | None:
    """The released family the file came from ('ULIP', 'OpenShape', 'Uni3D'); None for CG3D's own."""
    return self.config.get('released')

  def size(self) -> dict:
    """The encoder's size as results.json records it: its parameter count and the widths it was built with."""
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(self.encoder_vars['params']))
    shape = {k: int(getattr(self.encoder, k)) for k in ('width', 'depth', 'num_heads') if hasattr(self.encoder, k)}
    return {'parameters': count, **shape, 'embed_dim': self.embed_dim, 'in_channels': self.in_channels}

  @property
  def in_channels(self) -> int:
    return int(getattr(self.encoder, 'in_channels', 3))


def load_trained(path, *, step: int | None = None, num_points: int = 1024, model_config=None) -> TrainedModel:
  """A training workdir / checkpoints folder / step folder, or an original CG3D (or exported) .pth / .safetensors.

  num_points: the encoder's input size for a .pth that does not record its config (the original's 1024).
  model_config: a config.model that sizes what a .pth does not record (the fine-tuning run's); by default the
    file's own config, else CG3D's released sizes.
  """
  model = _load(path, step, num_points, model_config)
  bad = trees.non_finite(
    {'encoder': model.encoder_vars, 'prompts': {} if model.prompts is None else {'tokens': model.prompts}}
  )
  if bad:
    raise InputError(
      f'{model.source}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {", ".join(bad[:3])}); '
      'nothing was computed from them. An earlier checkpoint step (--step) may be intact.'
    )
  return model


def _load(path, step, num_points, model_config) -> TrainedModel:
  if str(path).endswith(TORCH_SUFFIXES):
    return _load_torch_file(pathlib.Path(path), num_points, model_config)
  saved = checkpoints.read_step(path, step)
  config = saved.config
  if 'finetune' in config:
    raise InputError(f'{saved.path} is a fine-tuning checkpoint (a classifier), not a pretraining run')
  prompts = saved.state['params'].get('clip', {}).get('prompts', {}).get('tokens')
  return TrainedModel(
    encoder=build_encoder(config.model),
    encoder_vars={'params': saved.state['params']['encoder'], 'batch_stats': saved.state['batch_stats']},
    prompts=None if prompts is None else np.asarray(prompts),
    prompt_mode=config.clip.prompt.mode if prompts is not None else 'none',
    config=config,
    step=saved.step,
    source=str(saved.path),
    metrics=saved.metrics,
  )


def _load_torch_file(path: pathlib.Path, num_points: int, model_config) -> TrainedModel:
  from cg3d_jax.weights import cg3d_pth, ulip  # torch only on this path

  loaded = cg3d_pth.load_file(path)  # one read, whichever family wrote the file
  if ulip.is_ulip_container(loaded):
    return _load_ulip(path, loaded, model_config)
  from cg3d_jax.weights import openshape_pt

  if openshape_pt.is_openshape_container(loaded):
    return _load_openshape(path, loaded)
  from cg3d_jax.weights import uni3d_pt

  if uni3d_pt.is_uni3d_container(loaded):
    return _load_uni3d(path, loaded)
  encoder_name, params, batch_stats, prompts, info = cg3d_pth.load_cg3d_checkpoint(
    path, model_config=model_config, loaded=loaded
  )
  saved = info['config'] or {}
  if saved:
    config = ml_collections.ConfigDict(saved)
  else:
    num_tokens = 5 if prompts is None else int(prompts.shape[1])
    config = ml_collections.ConfigDict(
      {
        'model': {'encoder': encoder_name, 'num_points': num_points},
        'clip': {'path': None, 'prompt': {'mode': info['prompt_mode'], 'num_tokens': num_tokens}},
      }
    )
  step = info['step'] if isinstance(info['step'], int) else max(info['epoch'], 0)
  return TrainedModel(
    encoder=info['model'],
    encoder_vars={'params': jax.tree.map(jnp.asarray, params), 'batch_stats': jax.tree.map(jnp.asarray, batch_stats)},
    prompts=prompts,
    prompt_mode=info['prompt_mode'],
    config=config,
    step=step,
    source=str(path),
    metrics=info['metrics'] or None,
    frozen_visual=info['frozen_visual'],
  )


def _load_ulip(path: pathlib.Path, loaded, model_config) -> TrainedModel:
  """A released ULIP / ULIP-2 checkpoint: its Point-BERT encoder with the bias-free projection, no prompts. ULIP-1's
  file holds the SLIP towers it aligns to, so it is its own CLIP; ULIP-2's CLIP (OpenCLIP ViT-bigG-14) is given."""
  from cg3d_jax.weights import ulip

  state = ulip.point_state(path, loaded)
  model = None
  if model_config is not None:
    model = PointTransformer.from_config(model_config).clone(projection_bias=False, num_classes=None)
  model, params, batch_stats, _ = ulip.from_torch(path, state, model)
  release = ulip.release_of(model)
  own_towers = 'visual.pos_embed' in state and 'token_embedding.weight' in state
  grouping = {'num_groups': model.num_groups, 'group_size': model.group_size}
  sizes = {'width': model.width, 'depth': model.depth, 'num_heads': model.num_heads, **grouping}
  extra = {
    'model': {'point_transformer': {**sizes, 'projection_bias': False}},
    'clip': {'path': str(path) if own_towers else None},
    # Not in the weights: ULIP's configs say them (weights/ulip.py); a run started from the file sets its own.
    'unrecorded': ['model.point_transformer.num_groups', 'model.point_transformer.group_size', 'model.num_points'],
  }
  epoch = loaded.get('epoch')
  best = loaded.get('best_acc1')
  out = _released(
    path,
    model,
    params,
    batch_stats,
    released='ULIP',
    family=release.name if release else f'ULIP (Point-BERT, {model.embed_dim}-dimensional projection)',
    num_points=release.num_points if release else 8192,
    step=epoch if isinstance(epoch, int) else 0,
    config=extra,
  )
  out.metrics = {'best_acc1': float(best)} if isinstance(best, (int, float)) else None
  return out


def _released(
  path, model, params, batch_stats, *, released: str, family: str, num_points: int, step: int, config: dict = None
):
  """A released encoder file's TrainedModel: no prompts; its CLIP given (or its class features precomputed); what
  the file does not record (the points its authors evaluate with) marked as such."""
  model_config = {
    'encoder': {'PPAT': 'ppat', 'Uni3D': 'uni3d'}.get(type(model).__name__, 'point_transformer'),
    'num_points': num_points,
    'embed_dim': model.embed_dim,
    'in_channels': model.in_channels,
  }
  base = {
    'model': model_config,
    'clip': {'path': None, 'prompt': {'mode': 'none', 'num_tokens': 0}},
    'family': family,
    'released': released,  # whose published protocol evaluates it (evaluators/protocols.py)
    'unrecorded': ['model.num_points'],
  }
  return TrainedModel(
    encoder=model,
    encoder_vars={'params': jax.tree.map(jnp.asarray, params), 'batch_stats': jax.tree.map(jnp.asarray, batch_stats)},
    prompts=None,
    prompt_mode='none',
    config=ml_collections.ConfigDict(_merged(base, config or {})),
    step=step,
    source=str(path),
  )


def _merged(base: dict, extra: dict) -> dict:
  out = dict(base)
  for key, value in extra.items():
    out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
  return out


def _load_openshape(path: pathlib.Path, loaded) -> TrainedModel:
  """A released OpenShape PPAT checkpoint (model.pt): its point transformer and `proj` into OpenCLIP ViT-bigG-14's
  space, no prompts and no CLIP (its class features are precomputed, or the bigG folder is given). Farthest-point
  sampling of its patch centres starts at index 0 (OpenShape's DGL sampler starts at a random one)."""
  from cg3d_jax.weights import openshape_pt

  model, params, batch_stats, info = openshape_pt.read_openshape_checkpoint(path, loaded=loaded)
  scaling = f', scaling {info["scaling"]}' if info['scaling'] else ''
  step = info['step'] if isinstance(info['step'], int) else info['epoch'] if isinstance(info['epoch'], int) else 0
  family = f'OpenShape (PointBERT / PPAT{scaling})'
  # Not in the weights: the patch count and ball query (the scaling's, or assumed); a run started from it sets its own.
  grouping = ['model.ppat.num_patches', 'model.ppat.radius', 'model.ppat.num_samples']
  return _released(
    path,
    model,
    params,
    batch_stats,
    released='OpenShape',
    family=family,
    num_points=10000,
    step=int(step),
    config={'unrecorded': ['model.num_points', *grouping]},
  )


def _load_uni3d(path: pathlib.Path, loaded) -> TrainedModel:
  """A released Uni3D checkpoint (DeepSpeed's model states, float16 upcast exactly): its EVA point encoder and
  `trans2embed` into EVA02-E-14-plus's space (1024), no prompts and no CLIP: the package cannot run that text tower,
  so its class features come precomputed or from the user's file (config.eval.prompts='file')."""
  from cg3d_jax.weights import uni3d_pt

  model, params, batch_stats, info = uni3d_pt.read_uni3d_checkpoint(path, loaded=loaded)
  family = f'Uni3D {info["size"]}' if info['size'] else f'Uni3D ({model.width} wide, {model.depth} blocks)'
  step = info.get('global_steps') if isinstance(info.get('global_steps'), int) else info.get('epoch')
  grouping = ['model.uni3d.num_groups', 'model.uni3d.group_size']  # no weights: a run started from it sets its own
  return _released(
    path,
    model,
    params,
    batch_stats,
    released='Uni3D',
    family=family,
    num_points=10000,
    step=int(step or 0),
    config={'unrecorded': ['model.num_points', *grouping]},
  )


@dataclasses.dataclass
class ScoringModel:
  """A trained encoder beside its frozen CLIP, with the trained prompts in CLIP's parameters."""

  trained: TrainedModel
  model: CG3D
  clip: LoadedCLIP | None  # clip.params['prompts'] holds the trained prompts; None: labels scored from a file

  @property
  def encoder_vars(self) -> dict:
    return self.trained.encoder_vars

  @property
  def clip_params(self) -> dict | None:
    return None if self.clip is None else self.clip.params

  def logit_scale(self) -> float:
    """The temperature of label probabilities: the CLIP's (frozen in CG3D), or without one CLIP's trained 100."""
    return RELEASED_LOGIT_SCALE if self.clip is None else float(CG3D.logit_scale(self.clip.params))

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.trained.config

  @property
  def step(self) -> int:
    return self.trained.step

  @property
  def source(self) -> str:
    return self.trained.source


def without_clip(trained: TrainedModel) -> ScoringModel:
  """A model that scores point features against label features given as numbers (a class-feature file): no text
  tower, so no prompts to put anywhere (a checkpoint that trained some needs its CLIP: with_clip)."""
  if trained.prompts is not None:
    raise InputError(
      f'{trained.source} trained visual prompts, which only act inside its CLIP: give the CLIP (--clip_path) '
      'instead of label features from a file'
    )
  return ScoringModel(
    trained=trained, model=CG3D(encoder=trained.encoder, clip=None, num_points=trained.num_points), clip=None
  )


def encode_as_evaluated(trained: TrainedModel, ev) -> None:
  """The encoder's input size as config.eval sets it (`num_points`, e.g. fewer than a released file's default), after
  checking that the split stores at least that many points per cloud (farthest-point sampling picks them)."""
  if ev.get('num_points'):
    trained.config.model.num_points = int(ev.num_points)
  stored = ev.get('num_stored_points')
  if stored is not None and stored < trained.num_points:
    raise ConfigError(
      f'config.eval.num_stored_points={stored} is fewer than the {trained.num_points} points {trained.source} '
      f'encodes (farthest-point sampling picks them from the stored ones): at least {trained.num_points}'
    )


def with_clip(trained: TrainedModel, clip_path: str | None = None) -> ScoringModel:
  """Loads the frozen CLIP (clip_path, else the one the run recorded) and puts the trained prompts into it."""
  path = clip_path or trained.config.get('clip', {}).get('path')
  if not path:
    raise InputError(
      f'{trained.source} does not say which CLIP it was trained with (an original CG3D checkpoint '
      'records none): give the local CLIP folder with --config.clip.path=... (or --clip_path)'
    )
  clip_config = trained.config.get('clip', {})
  num_tokens = int(clip_config.get('prompt', {}).get('num_tokens', 5))
  if trained.prompts is not None:
    num_tokens = int(trained.prompts.shape[1])
  clip = load_clip(
    path,
    prompt_mode=trained.prompt_mode,
    num_prompts=num_tokens,
    dtype=jnp.dtype(clip_config.get('dtype', 'float32')),
    seed=int(trained.config.get('seed', 0)),
  )
  if trained.frozen_visual:  # first: the most telling mismatch
    _check_frozen_tower(trained, clip, path)
  expected = None if 'prompts' not in clip.params else tuple(clip.params['prompts']['tokens'].shape)
  found = None if trained.prompts is None else tuple(trained.prompts.shape)
  if expected != found:
    raise InputError(
      f'{trained.source}: trained prompts have shape {found} but the CLIP at {path} with prompt mode '
      f'{trained.prompt_mode!r} expects {expected}: is this the CLIP it was trained with?'
    )
  if found is not None:
    clip.params['prompts'] = {'tokens': jnp.asarray(trained.prompts)}
  if trained.embed_dim != clip.spec.projection_dim:
    raise InputError(
      f'{trained.source}: the encoder projects to {trained.embed_dim} but the CLIP at {path} to '
      f'{clip.spec.projection_dim}: not the joint space it was trained in'
    )
  return ScoringModel(
    trained=trained, model=CG3D(encoder=trained.encoder, clip=clip.model, num_points=trained.num_points), clip=clip
  )


def _check_frozen_tower(trained: TrainedModel, clip: LoadedCLIP, path) -> None:
  """The image tower an original CG3D .pth saved beside its prompts must be the SLIP tower loaded from `path`."""
  if clip.kind != 'slip':
    raise InputError(
      f'{trained.source} holds a SLIP image tower beside its prompts (visual_clip_model), but {path} '
      'is a transformers CLIP folder: pass the SLIP checkpoint it was trained with, e.g. '
      '--config.clip.path=slip_base_100ep.pt'
    )
  from cg3d_jax.clip import slip  # torch-free, but only this path needs it

  ours = slip.vision_state_dict(clip.params, clip.spec)
  missing = sorted(set(ours) - set(trained.frozen_visual))
  extra = sorted(set(trained.frozen_visual) - set(ours))
  if missing or extra:
    raise InputError(
      f'{trained.source}: visual_clip_model does not hold the image tower of {path} (missing '
      f'{missing[:3]}, unexpected {extra[:3]}): is this the SLIP it was trained with?'
    )
  for key, value in ours.items():
    saved = trained.frozen_visual[key]
    if saved.shape != value.shape or not np.array_equal(saved, value):
      detail = (
        f'shape {saved.shape} vs {value.shape}'
        if saved.shape != value.shape
        else f'max |difference| {float(np.max(np.abs(saved - value))):.3g}'
      )
      raise InputError(
        f'{trained.source}: visual_clip_model.{key} differs from the same tensor of {path} ({detail}): '
        'the prompts were trained inside another image tower; pass the SLIP checkpoint it was '
        'trained with'
      )


@dataclasses.dataclass
class Finetuned:
  """A fine-tuned classifier and its variables."""

  config: ml_collections.ConfigDict
  step: int
  model: nn.Module
  variables: dict  # {'params', 'batch_stats'} on one device
  metrics: dict | None  # saved with the step: 'epoch' and, after an evaluation, 'val/top1', 'val/class_mean'
  source: str


def load_finetuned(path, step: int | None = None) -> Finetuned:
  """A fine-tune workdir, its checkpoints/ folder or one step folder -> the classifier and its variables."""
  saved = checkpoints.read_step(path, step)
  if 'finetune' not in saved.config:
    raise InputError(f'{saved.path} is not a cg3d-jax fine-tuning checkpoint (its config has no finetune block)')
  config = saved.config
  return Finetuned(
    config=config,
    step=saved.step,
    model=build_classifier(config.model, int(config.model.num_classes)),
    variables={'params': saved.state['params'], 'batch_stats': saved.state['batch_stats']},
    metrics=saved.metrics,
    source=str(saved.path),
  )
