"""Reading a finished (or running) fine-tune checkpoint and exporting it in the original PyTorch fine-tune format.

`load_finetuned` rebuilds the classifier from the config saved with the checkpoint and reads its variables onto one
device (as train/trained.py does for pretraining checkpoints); `save_finetuned_pth` writes them as Point-BERT's
fine-tune container, whose `base_model` the original classifiers load strictly.
"""

import collections
import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any, Mapping

import flax.linen as nn

from cg3d_jax.models.classifiers import ENCODERS, build_classifier
from cg3d_jax.train import trained


@dataclasses.dataclass
class FinetunedModel:
  config: Any
  step: int
  model: nn.Module
  variables: dict  # {'params', 'batch_stats'} on one device
  metrics: dict | None  # saved with the step: 'epoch' and, after an evaluation, 'val/top1', 'val/class_mean'


def _read_json_item(path: pathlib.Path):
  for candidate in (path / 'metadata', path):  # orbax writes a JsonSave item as <item>/metadata
    if candidate.is_file():
      return json.loads(candidate.read_text())
  return None


def load_finetuned(path, step: int | None = None) -> FinetunedModel:
  """A fine-tune workdir, its checkpoints/ folder or one step folder -> the classifier and its variables."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  step_dir = trained.find_step_dir(path, step)
  raw = _read_json_item(step_dir / 'config')
  if raw is None or 'finetune' not in raw:
    raise ValueError(f'{step_dir} is not a cg3d-jax fine-tune checkpoint (its config has no finetune block)')
  config = ml_collections.ConfigDict(raw)
  state = trained.read_state(step_dir)
  return FinetunedModel(config=config, step=int(state['step']),
                        model=build_classifier(config.model, int(config.model.num_classes)),
                        variables={'params': state['params'], 'batch_stats': state['batch_stats']},
                        metrics=(_read_json_item(step_dir / 'extras') or {}).get('metrics'))


def _pointmlp_classifier_entries(params: Mapping[str, Any]) -> list:
  from cg3d_jax.weights import torch_io, torch_io_pointmlp  # pylint: disable=g-import-not-at-top
  pre = tuple(len([k for k in params[f'pre_blocks_{i}'] if k.startswith('block_')])
              for i in range(len([k for k in params if k.startswith('pre_blocks_')])))
  pos = tuple(len([k for k in params.get(f'pos_blocks_{i}', {}) if k.startswith('block_')]) for i in range(len(pre)))
  entries = [e for e in torch_io_pointmlp.pointmlp_entries(pre, pos) if not e.torch_key.startswith('projection.')]
  for i in (0, 4, 8):
    entries += torch_io.linear(f'classifier.{i}', f'classifier_{i}')
  for i in (1, 5):
    entries += torch_io.batch_norm(f'classifier.{i}', f'classifier_{i}')
  return entries


def finetuned_to_torch(encoder: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
                       num_batches_tracked: int = 0) -> 'collections.OrderedDict':
  """Fine-tuned classifier variables -> the original fine-tune `base_model` state dict.

  point_transformer: the pretraining keys without `projection.*`, with cls_head_finetune.{0,3} sized to C (what
  Point-BERT's PointTransformer classifier loads strictly). pointmlp: the CG3D PointMLP keys without `projection.*`
  plus the original pointMLP `classifier.{0,1,4,5,8}`.
  """
  from cg3d_jax.weights import torch_io  # pylint: disable=g-import-not-at-top
  params = {k: v for k, v in params.items() if k != 'projection'}
  if encoder == 'point_transformer':
    depth = len([k for k in params if k.startswith('blocks_')])
    entries = [e for e in torch_io.point_transformer_entries(depth, with_head=True)
               if not e.torch_key.startswith('projection.')]
  elif encoder == 'pointmlp':
    entries = _pointmlp_classifier_entries(params)
  else:
    raise ValueError(f'encoder must be one of {ENCODERS}, got {encoder!r}')
  return torch_io.flax_to_torch({'params': params, 'batch_stats': batch_stats}, entries,
                                num_batches_tracked=num_batches_tracked)


def save_finetuned_pth(path, finetuned: FinetunedModel) -> None:
  """Writes `{'base_model': state_dict, 'epoch', 'metrics': {'acc'}, 'best_metrics': {'acc'}}` (Point-BERT's
  fine-tune checkpoint container; accuracy in percent, of the exported step) to `path`, atomically."""
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = finetuned_to_torch(finetuned.config.model.encoder, finetuned.variables['params'],
                                  finetuned.variables['batch_stats'])
  metrics = finetuned.metrics or {}
  acc = 100.0 * float(metrics.get('val/top1', 0.0))
  container = {'base_model': state_dict, 'epoch': int(metrics.get('epoch', 0)), 'metrics': {'acc': acc},
               'best_metrics': {'acc': acc}}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  os.close(fd)
  try:
    torch.save(container, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
