"""A PyTorch reference of one CG3D training step, written after the original runner (runner_CG3D_VPT.py), for
tests/test_step_parity.py. Nothing here calls the code under test: the point encoder is the PyTorch twin with the
original names, CLIP is transformers' PyTorch CLIPModel with the prompt insertion of twins/prompted_clip.py, the
optimizers are torch.optim's own AdamW and SGD with Point-BERT's parameter groups, clipping is
torch.nn.utils.clip_grad_norm_, and the learning rate follows timm's CosineLRScheduler stepped once per epoch.

Per step: text features of the batch's captions from the frozen text tower, prompted image features, point features,
all L2-normalised; s = exp(CLIP's frozen logit_scale); three symmetric InfoNCE losses. Which loss trains what:
  joint        the encoder from point<->text + point<->image (image features detached), the prompts from
               image<->text, both optimizers step;
  alternating  batches at an even index within their epoch (the runner's `idx % 2 == 0`): the encoder from
               point<->text + point<->image, against the current prompted image features; odd indices: the prompts
               from image<->text. The encoder runs in train mode on every batch (the runner forwards it before the
               branch), so its BatchNorm statistics move on prompt steps too.
Learning rates: 'per_epoch' evaluates timm's cosine at the batch's epoch; 'original' keeps each optimizer at the lr
its scheduler was last stepped to by the runner's end-of-epoch rule (see `_end_of_batch`).
"""

import math

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
  """(CE(s a b^T, i) + CE(s b a^T, i)) / 2 over the batch: CLIP's symmetric loss."""
  logits = scale * a @ b.t()
  targets = torch.arange(a.shape[0])
  return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def point_bert_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
  """Point-BERT's add_weight_decay: no decay for 1-d tensors, biases and names containing 'token'."""
  decay, no_decay = [], []
  for name, param in module.named_parameters():
    if not param.requires_grad:
      continue
    if len(param.shape) == 1 or name.endswith('.bias') or 'token' in name:
      no_decay.append(param)
    else:
      decay.append(param)
  return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


# The optimizer settings the parity checks train with (tests/test_step_parity.py, bench/device_check.py): large
# enough learning rates that a few steps move every tensor, clipping active, and per-epoch schedules that change.
PARITY_ENCODER_OPTIM = dict(lr=2e-3, end_lr=1e-4, weight_decay=0.05, schedule='cosine_per_epoch', clip_norm=0.5)
PARITY_PROMPT_OPTIM = dict(
  lr=5e-2, end_lr=1e-3, momentum=0.9, weight_decay=1e-4, schedule='cosine_per_epoch', clip_norm=0.05
)


def cosine_per_epoch(lr: float, end_lr: float, epochs: int, epoch: int) -> float:
  """timm's CosineLRScheduler(t_initial=epochs, lr_min=end_lr, cycle_limit=1, no warmup) at `epoch`."""
  if epoch >= epochs:
    return end_lr
  return end_lr + 0.5 * (lr - end_lr) * (1 + math.cos(math.pi * epoch / epochs))


class ReferenceStep:
  """The original's training of the encoder twin and the prompts, one step at a time."""

  def __init__(
    self,
    encoder: torch.nn.Module,
    clip,
    prompts: torch.Tensor,
    *,
    encoder_optim: dict,
    prompt_optim: dict,
    steps_per_epoch: int,
    epochs: int,
    mode: str,
    prompted_image_features,
    lr_schedule: str = 'per_epoch',
  ):
    self.encoder, self.clip, self.mode = encoder, clip, mode
    self.prompts = torch.nn.Parameter(prompts.clone())
    self.features = prompted_image_features
    self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
    self.encoder_optim, self.prompt_optim = dict(encoder_optim), dict(prompt_optim)
    self.adamw = torch.optim.AdamW(
      point_bert_groups(encoder, encoder_optim['weight_decay']),
      lr=encoder_optim['lr'],
      betas=(encoder_optim['b1'], encoder_optim['b2']),
      eps=1e-8,
    )
    self.sgd = torch.optim.SGD(
      [self.prompts],
      lr=prompt_optim['lr'],
      momentum=prompt_optim['momentum'],
      weight_decay=prompt_optim['weight_decay'],
    )
    for p in clip.parameters():
      p.requires_grad_(False)
    self.step_index = 0
    self.lr_schedule = lr_schedule
    self.lrs = []  # per step: {'encoder': lr, 'prompts': lr} of the optimizers that stepped
    # The runner's schedulers: at the end of each epoch it steps the encoder's when the epoch's last batch index is
    # even and the prompts' when it is odd (`scheduler.step(epoch)`: the lr for the next epoch is the schedule's value
    # at the epoch just finished). Until a scheduler is first stepped, its optimizer keeps the initial lr.
    self.epoch_lr = {'encoder': 0, 'prompts': 0}

  def _lr(self, settings: dict, group: str) -> float:
    epoch = self.step_index // self.steps_per_epoch
    if settings['schedule'] == 'constant':
      return settings['lr']
    if self.lr_schedule == 'original':
      epoch = self.epoch_lr[group]
    return cosine_per_epoch(settings['lr'], settings['end_lr'], self.epochs, epoch)

  def _end_of_batch(self, index: int) -> None:
    if index == self.steps_per_epoch - 1:  # the runner's `if idx % 2 == 0: scheduler.step(epoch) else: ...`
      finished = self.step_index // self.steps_per_epoch
      self.epoch_lr['encoder' if index % 2 == 0 else 'prompts'] = finished

  def __call__(self, points, pixels, caption_ids) -> dict[str, float]:
    """One step on a batch: points (B, N, 3), pixels (B, 3, H, W), caption token ids (B, L). Returns the losses."""
    index = self.step_index % self.steps_per_epoch  # the runner's idx: the batch's index within its epoch
    encoder_step = self.mode == 'joint' or index % 2 == 0
    prompt_step = self.mode == 'joint' or index % 2 == 1
    scale = self.clip.logit_scale.exp()
    with torch.no_grad():
      text = self.clip.get_text_features(input_ids=caption_ids)
      text = F.normalize(getattr(text, 'pooler_output', text), dim=-1)  # transformers 5 returns an output object
    image = F.normalize(self.features(self.clip, pixels, self.prompts), dim=-1)
    losses, total = {}, 0.0
    self.encoder.train()
    if not encoder_step:
      with torch.no_grad():  # the runner forwards the encoder in train mode on every batch: its statistics move
        self.encoder(points)
    if encoder_step:
      point = F.normalize(self.encoder(points), dim=-1)
      losses['loss/point_text'] = info_nce(point, text, scale)
      losses['loss/point_image'] = info_nce(point, image.detach(), scale)
      total = total + losses['loss/point_text'] + losses['loss/point_image']
    if prompt_step:
      losses['loss/image_text'] = info_nce(image, text, scale)
      total = total + losses['loss/image_text']
    self.adamw.zero_grad()
    self.sgd.zero_grad()
    total.backward()
    lrs = {}
    if encoder_step:
      torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.encoder_optim['clip_norm'])
      lrs['encoder'] = self._lr(self.encoder_optim, 'encoder')
      for group in self.adamw.param_groups:
        group['lr'] = lrs['encoder']
      self.adamw.step()
    if prompt_step:
      torch.nn.utils.clip_grad_norm_([self.prompts], self.prompt_optim['clip_norm'])
      lrs['prompts'] = self._lr(self.prompt_optim, 'prompts')
      for group in self.sgd.param_groups:
        group['lr'] = lrs['prompts']
      self.sgd.step()
    self.lrs.append(lrs)
    self._end_of_batch(index)
    self.step_index += 1
    out = {k: float(v) for k, v in losses.items()}
    out['loss'] = float(total)
    return out
