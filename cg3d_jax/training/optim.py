"""Optimizers from a big_vision-style rule list: [(regex over '/'-joined parameter paths, settings or None)].

    rules = [('^encoder/', dict(name='adamw', lr=5e-5, end_lr=1e-6, weight_decay=0.05,
                                schedule='cosine_per_epoch', clip_norm=10.)),
             ('^clip/prompts/', dict(name='sgd', lr=2e-3, momentum=0.9, weight_decay=1e-4, clip_norm=10.)),
             ('^clip/', None)]

The first rule whose regex matches a leaf's path (`re.search`) decides its group; `None` freezes it. A leaf that
no rule matches is an error naming it, so a renamed parameter cannot silently fall out of training.

Groups. A rule's group is called `settings['group']` if given, else its regex reduced to a name ('^encoder/' ->
'encoder', '^clip/prompts/' -> 'clip_prompts'); every frozen leaf is in group 'frozen'. Each group is its own
chain: clip by global norm (over that group's leaves only, as the original clips each optimizer's parameters;
optax scales by clip/norm where torch's clip_grad_norm_ uses clip/(norm + 1e-6)), weight decay, optimizer,
learning-rate schedule. Frozen leaves get `optax.set_to_zero()`, which has no state.

The transform works on full trees and on `partition`ed ones (frozen leaves replaced by `optax.MaskedNode()`): take
gradients with respect to the trainable part only, then update, apply and `merge` back.

Weight decay (decoupled for AdamW, L2-into-the-gradient for SGD, as torch does each). Which leaves decay is the
group's `weight_decay_mask`:
  'original' (default for adamw): Point-BERT/CG3D's `add_weight_decay`: no decay for leaves with ndim <= 1 (per
      layer: a scanned stack's leading layer axis does not count), leaves
      named 'bias', and leaves whose path contains 'token' (cls_token, prompt tokens). Everything else decays,
      including `cls_pos` (a (1, 1, C) array without 'token' in its name), exactly like the original.
  'all' (default for sgd): every leaf of the group, as torch.optim.SGD(weight_decay=...) does for the prompts.
  'none': no leaf.
`no_decay_regex`, when set, also exempts every leaf whose path it matches (`re.search`): leaves that get no gradient
in a phase of training (the pretraining run's classification head), which torch's optimizers skip entirely, decay
included.

Schedules. A group's schedule is evaluated at the global step of its update, which `steps_on` recovers from the
number of updates that group's transform has seen (optax's own counter): 'all' (default), the group updates on
every step; 'even' / 'odd', on the batches whose index within their epoch is even / odd, as the original runner
alternates its two optimizers (`select_groups` below keeps the other steps out). With an odd number of batches per
epoch an epoch's last batch and the next one's first are both even, so the mapping goes through the epoch.
`lr_stepping` says which epoch's value a batch trains at:
  'per_epoch' (default): epoch e trains at lr(e);
  'original':  the runner's stepping: it calls a group's scheduler.step(e) at the end of epoch e only when that
               epoch's last batch index has the group's `scheduler_parity` ('even': the encoder's scheduler, 'odd':
               the prompts'), so with such epochs epoch e trains at lr(e - 1) (epoch 0 at lr(0)), and otherwise at
               lr(0) throughout.
Values are computed in the default float precision (float64 where x64 is on, as in the parity tests). The kinds:
  'constant':          lr.
  'cosine_per_epoch':  timm's CosineLRScheduler(t_initial=epochs, lr_min=end_lr, warmup_t=warmup_epochs,
                       warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True), which the original steps once per
                       epoch; here evaluated at epoch = floor(step / steps_per_epoch), so the lr is a staircase.
                       epochs defaults to ceil(total_steps / steps_per_epoch).
  'cosine':            per-step cosine from lr to end_lr over total_steps after a linear warmup from warmup_lr.
"""

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from cg3d_jax.trees import in_stack, path_to_str

FROZEN = 'frozen'
ENCODER, PROMPTS = 'encoder', 'prompts'  # the pretraining recipes' optimizer groups

_COMMON_KEYS = {
  'name',
  'lr',
  'schedule',
  'end_lr',
  'warmup_epochs',
  'warmup_lr',
  'epochs',
  'clip_norm',
  'weight_decay',
  'weight_decay_mask',
  'no_decay_regex',
  'group',
  'steps_on',
  'lr_stepping',
  'scheduler_parity',
}
STEPS_ON = ('all', 'even', 'odd')
LR_STEPPINGS = ('per_epoch', 'original')
OPTIMIZER_KEYS = {'adamw': {'b1', 'b2', 'eps'}, 'sgd': {'momentum', 'nesterov'}}
_DEFAULT_DECAY_MASK = {'adamw': 'original', 'sgd': 'all'}
SCHEDULES = ('constant', 'cosine_per_epoch', 'cosine')

Rules = Sequence[tuple[str, Mapping[str, Any] | None]]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _as_dict(settings) -> dict:
  return settings.to_dict() if hasattr(settings, 'to_dict') else dict(settings)


def _group_name(regex: str, settings: Mapping[str, Any]) -> str:
  if settings.get('group'):
    return str(settings['group'])
  name = re.sub(r'[^0-9A-Za-z]+', '_', regex).strip('_')
  return name or 'all'


def _checked_rules(rules: Rules) -> list[tuple[re.Pattern, str, dict | None]]:
  """Compiles the rules and validates every settings dict up front, so a typo fails before any tracing."""
  checked, seen = [], {}
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f'optimizer rule {i} must be (regex, settings or None), got {rule!r}')
    regex, settings = rule
    try:
      pattern = re.compile(regex)
    except re.error as e:
      raise ValueError(f'optimizer rule {i}: bad regex {regex!r}: {e}') from e
    if settings is None:
      checked.append((pattern, FROZEN, None))
      continue
    settings = _as_dict(settings)
    name = settings.get('name')
    if name not in OPTIMIZER_KEYS:
      raise ValueError(f'optimizer rule {i} ({regex!r}): name must be one of {sorted(OPTIMIZER_KEYS)}, got {name!r}')
    unknown = set(settings) - _COMMON_KEYS - OPTIMIZER_KEYS[name]
    if unknown:
      raise ValueError(
        f'optimizer rule {i} ({regex!r}): unknown settings {sorted(unknown)} for {name}; allowed: '
        f'{sorted(_COMMON_KEYS | OPTIMIZER_KEYS[name])}'
      )
    if 'lr' not in settings:
      raise ValueError(f'optimizer rule {i} ({regex!r}): lr is required')
    if settings.get('schedule', 'constant') not in SCHEDULES:
      raise ValueError(
        f'optimizer rule {i} ({regex!r}): schedule must be one of {SCHEDULES}, got {settings["schedule"]!r}'
      )
    if settings.get('weight_decay_mask', 'original') not in ('original', 'all', 'none'):
      raise ValueError(
        f'optimizer rule {i} ({regex!r}): weight_decay_mask must be original, all or none, got '
        f'{settings["weight_decay_mask"]!r}'
      )
    group = _group_name(regex, settings)
    if group == FROZEN or group in seen:
      raise ValueError(
        f'optimizer rules {seen.get(group, "?")} and {i} both name group {group!r}; give one a '
        "distinct settings['group']"
      )
    seen[group] = i
    checked.append((pattern, group, settings))
  return checked


def _label_fn(checked) -> Callable[[Any], Any]:
  def label(path, _):
    name = path_to_str(path)
    for pattern, group, _settings in checked:
      if pattern.search(name):
        return group
    raise ValueError(f'parameter {name!r} matches no optimizer rule; rules: {[p.pattern for p, _, _ in checked]}')

  return lambda tree: jax.tree_util.tree_map_with_path(label, tree)


def param_labels(params, rules: Rules):
  """The group name of every leaf ('frozen' for frozen ones), as a tree shaped like params."""
  return _label_fn(_checked_rules(rules))(params)


def partition(params, rules: Rules):
  """(trainable, frozen): two trees shaped like params, each with `optax.MaskedNode()` where the other has a leaf."""
  labels = param_labels(params, rules)
  trainable = jax.tree.map(lambda g, p: optax.MaskedNode() if g == FROZEN else p, labels, params)
  frozen = jax.tree.map(lambda g, p: p if g == FROZEN else optax.MaskedNode(), labels, params)
  return trainable, frozen


def merge(trainable, frozen):
  """Inverse of `partition`."""
  return jax.tree.map(lambda t, f: f if _is_masked(t) else t, trainable, frozen, is_leaf=_is_masked)


def original_decay_mask(tree):
  """Point-BERT's add_weight_decay rule (see module docstring): True where weight decay applies."""

  def decays(path, leaf):
    name = path_to_str(path)
    ndim = jnp.ndim(leaf) - (1 if in_stack(name) else 0)  # a scanned stack's layer axis is not the leaf's own
    return ndim >= 2 and name.rsplit('/', 1)[-1] != 'bias' and 'token' not in name

  return jax.tree_util.tree_map_with_path(decays, tree)


def _decay_mask(settings):
  mode = settings.get('weight_decay_mask', _DEFAULT_DECAY_MASK[settings['name']])
  base = original_decay_mask if mode == 'original' else lambda tree: jax.tree.map(lambda _: mode == 'all', tree)
  if not settings.get('no_decay_regex'):
    return base
  exempt = re.compile(settings['no_decay_regex'])

  def mask(tree):
    return jax.tree_util.tree_map_with_path(
      lambda path, decays: decays and not exempt.search(path_to_str(path)), base(tree)
    )

  return mask


def _num_epochs(settings, steps_per_epoch: int, total_steps: int) -> int:
  if settings.get('epochs'):
    return int(settings['epochs'])
  return max(1, math.ceil(total_steps / steps_per_epoch))


def make_schedule(settings, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning rate of one group as a function of its update count (see module docstring)."""
  settings = _as_dict(settings)
  if steps_per_epoch < 1 or total_steps < 1:
    raise ValueError(f'steps_per_epoch and total_steps must be >= 1, got {steps_per_epoch} and {total_steps}')
  lr = float(settings['lr'])
  end_lr = float(settings.get('end_lr', 0.0))
  warmup_lr = float(settings.get('warmup_lr', end_lr))
  warmup_epochs = float(settings.get('warmup_epochs', 0) or 0)
  kind = settings.get('schedule', 'constant')
  dtype = jnp.result_type(float)  # float64 under x64: a float32 lr moved float64 Adam updates by ~3e-6 relative
  if kind == 'constant':
    return lambda step: jnp.full((), lr, dtype)
  if kind == 'cosine':
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(
      warmup_lr, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=end_lr
    )
  num_epochs = _num_epochs(settings, steps_per_epoch, total_steps)
  stepping = settings.get('lr_stepping', 'per_epoch')
  if stepping not in LR_STEPPINGS:
    raise ValueError(f'lr_stepping must be one of {LR_STEPPINGS}, got {stepping!r}')
  # The runner steps this group's scheduler at an epoch's end when the last batch index has the group's parity.
  stepped = (steps_per_epoch - 1) % 2 == (0 if settings.get('scheduler_parity', 'even') == 'even' else 1)

  def cosine_per_epoch(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    if stepping == 'original':
      epoch = jnp.maximum(epoch - 1, 0) if stepped else jnp.zeros_like(epoch)
    epoch = epoch.astype(dtype)
    cosine = end_lr + 0.5 * (lr - end_lr) * (1 + jnp.cos(jnp.pi * epoch / num_epochs))
    value = jnp.where(epoch < num_epochs, cosine, end_lr)  # timm's cycle_limit=1: lr_min after the last epoch
    if warmup_epochs:
      value = jnp.where(epoch < warmup_epochs, warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs, value)
    return value

  return cosine_per_epoch


def make_group_transform(settings, *, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> weight decay -> optimizer with its schedule, for the leaves of one group."""
  settings = _as_dict(settings)
  global_schedule = make_schedule(settings, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  at_step = update_step_fn(settings.get('steps_on', 'all'), steps_per_epoch)
  schedule = lambda count: global_schedule(at_step(count))
  weight_decay = float(settings.get('weight_decay', 0.0) or 0.0)
  parts = []
  if settings.get('clip_norm'):
    parts.append(optax.clip_by_global_norm(float(settings['clip_norm'])))
  if settings['name'] == 'adamw':
    parts.append(
      optax.adamw(
        schedule,
        b1=float(settings.get('b1', 0.9)),
        b2=float(settings.get('b2', 0.999)),
        eps=float(settings.get('eps', 1e-8)),
        weight_decay=weight_decay,
        mask=_decay_mask(settings),
      )
    )
  else:  # sgd: torch adds weight_decay * param to the (clipped) gradient before the momentum buffer
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask(settings)))
    momentum = float(settings.get('momentum', 0.0) or 0.0)
    parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=bool(settings.get('nesterov', False))))
  return optax.chain(*parts)


def update_step_fn(steps_on: str, steps_per_epoch: int) -> Callable[[Any], Any]:
  """count -> the global step of a group's count-th update (0-based), for `steps_on` (module docstring)."""
  if steps_on not in STEPS_ON:
    raise ValueError(f'steps_on must be one of {STEPS_ON}, got {steps_on!r}')
  if steps_on == 'all':
    return lambda count: count
  offset = 0 if steps_on == 'even' else 1
  per_epoch = (steps_per_epoch + 1 - offset) // 2  # even indices: ceil(spe / 2); odd ones: floor(spe / 2)
  if per_epoch < 1:
    raise ValueError(
      f"steps_on='odd' with {steps_per_epoch} batch per epoch: no batch index is odd, so the group "
      'would never be updated'
    )
  return lambda count: (count // per_epoch) * steps_per_epoch + 2 * (count % per_epoch) + offset


def make_optimizer(rules: Rules, *, steps_per_epoch: int, total_steps: int):
  """(optax.multi_transform over the groups, labels_fn: tree -> tree of group names)."""
  checked = _checked_rules(rules)
  transforms = {FROZEN: optax.set_to_zero()}
  for _pattern, group, settings in checked:
    if settings is not None:
      transforms[group] = make_group_transform(settings, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  labels_fn = _label_fn(checked)
  return optax.multi_transform(transforms, labels_fn), labels_fn


def group_names(rules: Rules) -> list[str]:
  """The trainable groups, in rule order."""
  return [group for _p, group, settings in _checked_rules(rules) if settings is not None]


def learning_rates(rules: Rules, step, *, steps_per_epoch: int, total_steps: int) -> dict[str, jax.Array]:
  """{group: learning rate at `step`} for logging; jit-safe in step."""
  return {
    group: make_schedule(settings, steps_per_epoch=steps_per_epoch, total_steps=total_steps)(step)
    for _p, group, settings in _checked_rules(rules)
    if settings is not None
  }


def global_norms(tree, rules: Rules) -> dict[str, jax.Array]:
  """{group: global L2 norm of that group's leaves} for every trainable group (0 for a group with no leaves here).

  Works on full trees and on partitioned ones (MaskedNode leaves are skipped); frozen leaves are never read.
  """
  checked = _checked_rules(rules)
  labels = _label_fn(checked)(tree)
  sums = {group: jnp.zeros((), jnp.float32) for _p, group, settings in checked if settings is not None}
  for group, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(tree)):
    if group != FROZEN:
      sums[group] = sums[group] + jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32)))
  return {group: jnp.sqrt(total) for group, total in sums.items()}


def select_groups(active: Mapping[str, Any], updates, new_state, old_state, labels_fn):
  """For alternating updates: groups whose `active[group]` is False get zero updates and keep their old state.

  `updates, new_state` come from `tx.update(grads, old_state, params)` with the multi_transform of
  `make_optimizer`; `active` maps group names to (traced) booleans, e.g. {'encoder': index % 2 == 0,
  'clip_prompts': index % 2 == 1} for the batch's index within its epoch. Groups not named stay as updated.
  Keeping the old state means an inactive group's momentum and schedule counter do not move, as when the original
  skipped that optimizer's step.
  """
  unknown = set(active) - set(new_state.inner_states)
  if unknown:
    raise ValueError(f'select_groups: unknown groups {sorted(unknown)}; groups: {sorted(new_state.inner_states)}')
  labels = labels_fn(updates)
  updates = jax.tree.map(lambda u, g: jnp.where(active[g], u, jnp.zeros_like(u)) if g in active else u, updates, labels)
  inner = dict(new_state.inner_states)
  for group, is_active in active.items():
    inner[group] = jax.tree.map(
      lambda new, old, on=is_active: jnp.where(on, new, old),
      new_state.inner_states[group],
      old_state.inner_states[group],
    )
  return updates, new_state._replace(inner_states=inner)


# --- the pretraining recipes' rules --------------------------------------------------------------------------


def optimizer_rules(config) -> list:
  """big_vision-style (regex, settings | None) list: the first match decides; None freezes."""
  # Alternating mode updates the encoder on the batches with an even index within their epoch and the prompts on
  # the odd ones (the original runner's idx % 2); steps_on lets each group's schedule follow the global step and
  # epoch rather than its own update count. lr_stepping 'original' applies the runner's end-of-epoch scheduler
  # calls (optim module docstring), whose cosine spans config.train.epochs although the runner trains one more.
  alternating = config.train.mode == 'alternating'
  stepping = dict(lr_stepping=config.train.lr_schedule)
  if stepping['lr_stepping'] == 'original':
    stepping['epochs'] = int(config.train.epochs)
  return [
    # The classification head (kept for strict exports and fine-tuning) gets no gradient in pretraining; torch's
    # AdamW skips a parameter without a gradient, decay included, so it must not decay here either.
    (
      '^encoder/',
      dict(
        stepping,
        **config.train.encoder_optim,
        group=ENCODER,
        steps_on='even' if alternating else 'all',
        scheduler_parity='even',
        no_decay_regex='^encoder/cls_head_',
      ),
    ),
    (
      '^clip/prompts/',
      dict(
        stepping,
        **config.train.prompt_optim,
        group=PROMPTS,
        steps_on='odd' if alternating else 'all',
        scheduler_parity='odd',
      ),
    ),
    ('^clip/', None),
  ]


def _prune(tree):
  """Drops optax.MaskedNode leaves and the dicts they leave empty, giving a plain nested dict."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, (dict, optax.MaskedNode)) and not _leaves(v))}
  return tree


def _leaves(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def split_trainable(params: dict, rules) -> tuple[dict, dict]:
  """(trainable, frozen) as two plain nested dicts, by the optimizer rules."""
  trainable, frozen = partition(params, rules)
  return _prune(trainable), _prune(frozen)


def feature_optimizer_rules(config) -> list:
  """The encoder and the temperature in one AdamW group (OpenShape optimises both together); the scalar
  temperature never decays, nor does the unused classification head."""
  return [
    (
      '^(encoder/|logit_scale$)',
      dict(config.train.encoder_optim, group=ENCODER, no_decay_regex='^encoder/cls_head_|^logit_scale$'),
    )
  ]
