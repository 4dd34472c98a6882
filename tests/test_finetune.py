"""Fine-tuning: initialisation from pretraining, a short real fine-tune, voting, the loss, the data stream, export.

The real ModelNet40 fixtures hold 13 airplanes and 10 bathtubs. The official split lists put only 3 airplanes in
train, which cannot teach two classes, so the fixture here keeps the real files and writes its own lists: 8
airplanes and 8 bathtubs to train on, 5 airplanes and 2 bathtubs held out. The short fine-tune must classify all
16 training objects (measured in evaluation mode) and both classes of the held-out 7, where a model that always
answers one class gets a class-mean accuracy of 0.5.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from cg3d_jax import checkpoints, export, finetune, sharding, trained, trees
from cg3d_jax.configs import finetune_modelnet40
from cg3d_jax.data import builders, device_transforms, host_transforms, pipeline
from cg3d_jax.evaluators.classification import ClassificationEvaluator
from cg3d_jax.models import classifiers
from cg3d_jax.models.point_ops import sample_points
from cg3d_jax.models.pointmlp import PointMLP
from cg3d_jax.training import finetune as ft
from cg3d_jax.twins import point_transformer as torch_twin
from cg3d_jax.weights import cg3d_pth, pointmlp_state_dict, torch_io
from tests.conftest import apply_overrides, modelnet_root, run_command

NUM_STORED = 128  # points kept per fixture cloud (the first 128 of 10,000), FPS'd to 64 per step
TINY_PT = dict(width=32, depth=2, num_heads=2, num_groups=16, group_size=8, encoder_dim=32)  # = tiny_checkpoint's


TRAIN_IDS = [f'airplane_{i:04d}' for i in range(627, 635)] + [f'bathtub_{i:04d}' for i in range(107, 115)]
HELD_OUT_IDS = [f'airplane_{i:04d}' for i in (1, 2, 3, 635, 636)] + ['bathtub_0115', 'bathtub_0116']


@pytest.fixture(scope='session')
def modelnet_fixture(tmp_path_factory):
  """(manual_dir, data_dir): the real ModelNet40 fixture files with split lists of 16 training and 7 held-out
  objects of both classes, prepared by the real builder."""
  root = tmp_path_factory.mktemp('modelnet_manual') / 'modelnet40_normal_resampled'
  root.mkdir()
  source = modelnet_root()
  for name in ('airplane', 'bathtub', 'modelnet40_shape_names.txt'):
    (root / name).symlink_to(source / name)
  (root / 'modelnet40_train.txt').write_text('\n'.join(TRAIN_IDS) + '\n')
  (root / 'modelnet40_test.txt').write_text('\n'.join(HELD_OUT_IDS) + '\n')
  data_dir = str(tmp_path_factory.mktemp('modelnet_tfds'))
  builders.get_builder('modelnet40', data_dir=data_dir, manual_dir=str(root))
  return str(root), data_dir


def tiny_finetune_overrides(modelnet) -> dict:
  """The fine-tune recipe shrunk for tests, as {'a.b': value} (applied in-process or passed as --config.a.b=value)."""
  manual, data_dir = modelnet
  return {
    'data.manual_dir': manual,
    'data.data_dir': data_dir,
    'eval.split': 'train',  # measured on the training objects; the held-out ones are checked apart
    'data.num_stored_points': NUM_STORED,
    'data.shuffle_buffer': 32,
    'model.embed_dim': 32,
    'model.num_points': 64,
    **{f'model.point_transformer.{k}': v for k, v in TINY_PT.items()},
    'finetune.fps_points': 80,
    'finetune.votes': 1,
    'finetune.eval_every_epochs': 0,
    # Constant lr: the recipe's 300-epoch cosine with 10 warmup epochs means nothing over 2-example epochs.
    'finetune.optim.point_transformer.lr': 3e-3,
    'finetune.optim.point_transformer.schedule': 'constant',
    'finetune.optim.point_transformer.warmup_epochs': 0,
    'train.batch_size': 8,
    'train.total_steps': 150,
    'train.log_every': 10,
    'eval.batch_size': 8,
    'checkpoint.async_save': False,
    'checkpoint.every_steps': 1000,
    'logging.tensorboard': False,
  }


def tiny_finetune_config(modelnet, **overrides):
  return apply_overrides(finetune_modelnet40.get_config(), {**tiny_finetune_overrides(modelnet), **overrides})


def _flat(tree):
  return {k: np.asarray(v) for k, v in trees.flatten(tree).items()}


def test_init_from_pretraining_copies_encoder_and_keeps_fresh_head(modelnet_fixture, tiny_checkpoint):
  config = tiny_finetune_config(modelnet_fixture)
  setup = ft.build_setup(config, init=str(tiny_checkpoint))
  # The pretrained variables, read back from disk independently of the fine-tune code.
  saved = checkpoints.read_step(tiny_checkpoint).state
  pre_params, pre_stats = _flat(saved['params']['encoder']), _flat(saved['batch_stats'])
  params, stats = _flat(jax.device_get(setup.state['params'])), _flat(jax.device_get(setup.state['batch_stats']))
  init_rng = jax.random.split(jax.random.key(config.seed))[0]  # build_setup's
  fresh = classifiers.init_variables(setup.model, init_rng, config.model.num_points)
  fresh_params = _flat(fresh['params'])

  trunk = [k for k in pre_params if not k.startswith(('projection', 'cls_head_'))]
  assert len(trunk) > 30 and set(params) == set(trunk) | {
    k for k in fresh_params if k.startswith(('projection', 'cls_head_'))
  }
  for k in trunk:
    np.testing.assert_array_equal(params[k], pre_params[k], err_msg=k)
  assert set(stats) == set(pre_stats)
  for k in pre_stats:
    np.testing.assert_array_equal(stats[k], pre_stats[k], err_msg=k)
  # Head: the fresh initialisation, sized to ModelNet40, not the 55-class pretraining head.
  assert pre_params['cls_head_1/kernel'].shape == (256, 55) and params['cls_head_1/kernel'].shape == (256, 40)
  for k in ('cls_head_0/kernel', 'cls_head_0/bias', 'cls_head_1/kernel', 'cls_head_1/bias', 'projection/kernel'):
    np.testing.assert_array_equal(params[k], fresh_params[k], err_msg=k)
  assert not np.array_equal(params['projection/kernel'], pre_params['projection/kernel'])
  assert np.all(params['cls_head_1/bias'] == 0) and 0.015 < params['cls_head_1/kernel'].std() < 0.025  # trunc N(0.02)
  # The projection is frozen (no optimizer state); everything else trains.
  labels = ft.optim.param_labels(setup.state['params'], ft.optimizer_rules(config))
  assert labels['projection']['kernel'] == 'frozen' and labels['cls_head_1']['kernel'] == 'classifier'


def test_init_from_original_pth(modelnet_fixture, tiny_checkpoint, tmp_path):
  """An original-format container {'base_model': state_dict} initialises the same trunk as the workdir does."""
  pre = trained.load_trained(tiny_checkpoint)
  state_dict = torch_io.point_transformer_to_torch(pre.encoder_vars['params'], pre.encoder_vars['batch_stats'])
  path = tmp_path / 'cg3d.pth'
  torch.save({'base_model': state_dict, 'epoch': 4}, path)
  config = tiny_finetune_config(modelnet_fixture)
  model = classifiers.build_classifier(config.model, 40)
  fresh = classifiers.init_variables(model, jax.random.key(0), config.model.num_points)
  loaded = ft.transfer_encoder(fresh, trained.load_trained(path, model_config=config.model), 'point_transformer')
  expected = ft.transfer_encoder(fresh, pre, 'point_transformer')
  for (k, a), b in zip(_flat(loaded).items(), _flat(expected).values()):
    np.testing.assert_array_equal(a, b, err_msg=k)


def test_init_rejects_mismatched_encoder(modelnet_fixture, tiny_checkpoint):
  config = tiny_finetune_config(modelnet_fixture, **{'model.point_transformer.depth': 3})
  model = classifiers.build_classifier(config.model, 40)
  shapes = jax.eval_shape(lambda: classifiers.init_variables(model, jax.random.key(0), config.model.num_points))
  pretrained = trained.load_trained(tiny_checkpoint)
  with pytest.raises(ValueError, match='blocks_2.* missing from the pretrained encoder'):
    ft.transfer_encoder(shapes, pretrained, 'point_transformer')
  with pytest.raises(ValueError, match='holds a point_transformer encoder'):
    ft.transfer_encoder(shapes, pretrained, 'pointmlp')


@pytest.fixture(scope='session')
def finetuned_run(tmp_path_factory, modelnet_fixture, tiny_checkpoint):
  """A 150-step fine-tune of the tiny pretrained PointTransformer on the 20 fixture objects (8-device mesh)."""
  workdir = tmp_path_factory.mktemp('finetune_run')
  config = tiny_finetune_config(modelnet_fixture)
  result = ft.finetune(config, str(workdir), init=str(tiny_checkpoint))
  return workdir, config, result


def test_short_finetune_reaches_full_training_accuracy(finetuned_run):
  workdir, config, result = finetuned_run
  # Evaluation mode (running BatchNorm statistics, no dropout, no augmentation) on the 16 training objects.
  assert result['val/count'] == 16
  assert result['val/top1'] == 1.0 and result['val/class_mean'] == 1.0
  rows = [r for r in _read_jsonl(workdir / 'finetune.jsonl') if 'loss' in r]
  assert rows[-1]['loss'] < rows[0]['loss']
  # Held out: 5 airplanes and 2 bathtubs never trained on. Always answering one class scores a class-mean of 0.5;
  # this run classifies all 7 (class-mean 1.0); the bound is one a regression to one class cannot meet.
  held_out = _eval_on(trained.load_finetuned(workdir), config, split='test')
  assert held_out['count'] == 7 and held_out['class_mean'] > 0.5, held_out


def _read_jsonl(path):
  from cg3d_jax.metric_writer import read_jsonl

  return read_jsonl(str(path))


def _eval_on(finetuned, config, *, split, votes=1, vote_augment=True):
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  batches = functools.partial(
    pipeline.make_eval_iterator,
    config.data.name,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    batch_size=config.eval.batch_size,
    sharding=sharding.batch_sharding(mesh),
    num_points_stored=config.data.num_stored_points,
    split=split,
    skip_bad=config.data.skip_bad,
  )
  evaluator = ClassificationEvaluator(
    finetuned.model,
    batches=batches,
    mesh=mesh,
    num_classes=40,
    num_points=config.model.num_points,
    fps_points=device_transforms.fps_count(config.model.num_points, NUM_STORED, config.finetune.fps_points),
    votes=votes,
    vote_augment=vote_augment,
    prefix='',
  )
  outputs = evaluator.outputs(jax.device_put(finetuned.variables, sharding.replicated(mesh)))
  return {**evaluator.metrics(outputs), 'logits': outputs['logits'], 'labels': outputs['label']}


def test_voting_without_augmentation_equals_single_pass(finetuned_run):
  workdir, config, _ = finetuned_run
  finetuned = trained.load_finetuned(workdir)
  single = _eval_on(finetuned, config, split='test')
  voted = _eval_on(finetuned, config, split='test', votes=10, vote_augment=False)
  np.testing.assert_array_equal(single['labels'], voted['labels'])
  np.testing.assert_allclose(voted['logits'], single['logits'], rtol=1e-5, atol=1e-5)
  assert voted['top1'] == single['top1'] and voted['class_mean'] == single['class_mean']


def test_voting_with_augmentation_averages_augmented_views(finetuned_run):
  """The recipe's voting (vote_augment): each pass classifies one view (a random subset of the FPS points shared by
  the batch, then a per-cloud scale in [2/3, 3/2] and shift in [-0.2, 0.2] per axis, as the original's test_vote
  does), and the answer is the mean of the passes' logits. The views are rebuilt here from the evaluator's keys
  (seed 0, batch 0, split into one key per pass; the subset from each pass key's first half), their geometry
  checked in NumPy, and each classified alone."""
  workdir, config, _ = finetuned_run
  finetuned = trained.load_finetuned(workdir)
  votes = 3
  voted = _eval_on(finetuned, config, split='test', votes=votes)
  single = _eval_on(finetuned, config, split='test')
  assert np.abs(voted['logits'] - single['logits']).max() > 1e-3  # the passes were augmented

  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  batch = next(
    pipeline.make_eval_iterator(
      'modelnet40',
      data_dir=config.data.data_dir,
      batch_size=8,
      sharding=sharding.batch_sharding(mesh),
      num_points_stored=NUM_STORED,
      split='test',
      skip_bad=True,
    )
  )
  real = np.asarray(batch['mask'])
  assert real.sum() == 7
  fps = device_transforms.fps_count(config.model.num_points, NUM_STORED, config.finetune.fps_points)
  sampled = np.asarray(sample_points(batch['points'], fps))
  passes = []
  logits = jax.jit(lambda variables, view: classifiers.classifier_logits(finetuned.model, variables, view, train=False))
  for pass_key in jax.random.split(jax.random.fold_in(jax.random.key(0), 0), votes):
    view = np.asarray(
      device_transforms.sample_training_points(pass_key, jnp.asarray(sampled), config.model.num_points, augment=True)
    )
    subset = np.asarray(
      jax.random.choice(jax.random.split(pass_key)[0], fps, (config.model.num_points,), replace=False)
    )
    assert len(set(subset.tolist())) == config.model.num_points  # a subset of the FPS points, without repeats
    for b in np.flatnonzero(real):
      # One affine map per cloud: fit it by least squares and check it is a per-axis scale and shift in range.
      fit = np.linalg.lstsq(np.c_[sampled[b, subset], np.ones(len(subset))], view[b], rcond=None)[0]
      scale, shift = np.diag(fit[:3]), fit[3]
      np.testing.assert_allclose(fit[:3], np.diag(scale), atol=1e-5)  # no rotation, no shear
      np.testing.assert_allclose(view[b], sampled[b, subset] * scale + shift, atol=1e-5)
      assert np.all((2 / 3 - 1e-5 <= scale) & (scale <= 1.5 + 1e-5)) and np.all(np.abs(shift) <= 0.2 + 1e-5)
    passes.append(np.asarray(logits(finetuned.variables, jnp.asarray(view))[0]))
  np.testing.assert_allclose(voted['logits'], np.mean(passes, 0)[real], rtol=1e-5, atol=1e-5)


def test_export_loads_into_the_original_classifier(finetuned_run, modelnet_fixture, tmp_path, capsys):
  workdir, config, _ = finetuned_run
  finetuned = trained.load_finetuned(workdir)
  params, stats = finetuned.variables['params'], finetuned.variables['batch_stats']
  state_dict = cg3d_pth.classifier_state_dict('point_transformer', params, stats)
  pretraining_keys = list(torch_io.point_transformer_to_torch(params, stats).keys())
  assert list(state_dict) == [k for k in pretraining_keys if not k.startswith('projection.')]
  assert tuple(state_dict['cls_head_finetune.3.weight'].shape) == (40, 256)

  twin = torch_twin.PointTransformerProject(embed_dim=32, num_classes=40, **TINY_PT).eval()
  missing, unexpected = twin.load_state_dict(state_dict, strict=False)
  assert sorted(missing) == ['projection.bias', 'projection.weight'] and not unexpected
  batch = next(
    iter(
      pipeline.eval_local_batches(
        'modelnet40', data_dir=modelnet_fixture[1], batch_size=4, num_points_stored=NUM_STORED, skip_bad=True
      )
    )
  )
  points = np.asarray(sample_points(jnp.asarray(batch['points']), config.model.num_points), np.float64)
  # Float64 on both sides, grouping included: no near-tie among distances can be decided two ways.
  with jax.enable_x64(True):
    jax_logits = finetuned.model.clone(dtype=jnp.float64).apply(
      jax.tree.map(lambda x: np.asarray(x, np.float64), finetuned.variables), points, train=False, return_logits=True
    )
  with torch.no_grad():
    torch_logits = twin.double().forward_logits(torch.from_numpy(points)).numpy()
  np.testing.assert_allclose(torch_logits, np.asarray(jax_logits), rtol=0, atol=1e-9 * np.abs(torch_logits).max())

  # The export command writes Point-BERT's fine-tune container, and --verify compares the twin's logits.
  path = tmp_path / 'finetuned.pth'
  code = run_command(export.main, ['--checkpoint', str(workdir), '--out', str(path), '--verify'])
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert 'verify: OK' in out and 'logits' in out
  container = torch.load(path, weights_only=True)
  assert set(container) == {'base_model', 'epoch', 'metrics', 'best_metrics'}
  assert container['metrics']['acc'] == 100.0 and container['epoch'] == 75  # 150 steps of 2-step epochs
  assert list(container['base_model']) == list(state_dict)


def test_smoothed_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=6)
  eps = 0.2
  target = np.full((6, 5), eps / 4)
  target[np.arange(6), labels] = 1 - eps
  shifted = logits - logits.max(1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  expected = -(target * log_probs).sum(1).mean()
  np.testing.assert_allclose(
    ft.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps), expected, rtol=1e-6
  )
  np.testing.assert_allclose(
    ft.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.0),
    optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
    rtol=1e-6,
  )


def test_train_stream_is_the_fixture_data_and_resumes(modelnet_fixture):
  config = tiny_finetune_config(modelnet_fixture)
  # NumPy reference: the first NUM_STORED points of each raw fixture file, centred and scaled to the unit sphere.
  root = modelnet_root()
  reference = {
    n: host_transforms.normalize_unit_sphere_np(
      np.loadtxt(root / n.rsplit('_', 1)[0] / f'{n}.txt', delimiter=',')[:NUM_STORED, :3]
    )
    for n in TRAIN_IDS
  }

  def stream(start, count):
    ds = pipeline.labelled_local_dataset(
      config.data, global_batch_size=8, seed=3, start_step=start, process_index=0, process_count=1
    )
    return [b for _, b in zip(range(count), ds.as_numpy_iterator())]

  full, resumed = stream(0, 6), stream(3, 3)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a['points'], b['points'])
    np.testing.assert_array_equal(a['label'], b['label'])
  epoch = np.concatenate([b['points'] for b in full])[:16]  # batches run across epochs: 16 = one epoch
  epoch_labels = np.concatenate([b['label'] for b in full])[:16]
  matched = []
  for cloud, label in zip(epoch, epoch_labels):
    hits = [n for n, ref in reference.items() if np.allclose(cloud, ref, atol=1e-5)]
    assert len(hits) == 1 and label == (0 if hits[0].startswith('airplane') else 1)
    matched.append(hits[0])
  assert sorted(matched) == sorted(reference)  # each object once per epoch
  assert pipeline.steps_per_epoch(config.data, 8) == 2


TINY_MLP = dict(
  embed_dim=8, dim_expansion=(2, 2), pre_blocks=(1, 1), pos_blocks=(1, 2), k_neighbors=(4, 4), reducers=(2, 2)
)


def test_pointmlp_classifier_trunk_init_and_export():
  encoder = PointMLP(**TINY_MLP, projection_dim=16)
  classifier = classifiers.PointMLPClassifier(**TINY_MLP, projection_dim=16, num_classes=7)
  points = jax.random.normal(jax.random.key(1), (4, 32, 3))
  pre = encoder.init(jax.random.key(2), points, train=False)
  # Move BatchNorm statistics off their init values so that copying them is visible.
  pre_stats = jax.tree.map(lambda x: x + 0.5, pre['batch_stats'])
  fresh = classifiers.init_variables(classifier, jax.random.key(3), 32)
  pretrained = trained.TrainedModel(
    encoder=encoder,
    encoder_vars={'params': pre['params'], 'batch_stats': pre_stats},
    prompts=None,
    prompt_mode='none',
    config=ml_collections.ConfigDict({'model': {'encoder': 'pointmlp', 'num_points': 32}}),
    step=0,
    source='test',
  )
  variables = ft.transfer_encoder(fresh, pretrained, 'pointmlp')
  flat, pre_flat = _flat(variables['params']), _flat(pre['params'])
  assert set(flat) == (
    {k for k in pre_flat if not k.startswith('projection')}
    | {k for k in _flat(fresh['params']) if k.startswith('classifier_')}
  )
  # The classifier's trunk is PointMLP's: its pooled feature through PointMLP's projection is PointMLP's output.
  pooled = classifier.apply(variables, points, train=False, return_features=True)
  proj = pre['params']['projection']
  expected = encoder.apply({'params': pre['params'], 'batch_stats': pre_stats}, points, train=False)
  np.testing.assert_allclose(pooled @ proj['kernel'] + proj['bias'], expected, rtol=1e-5, atol=1e-5)

  # Export: CG3D's PointMLP keys without the projection, plus the original pointMLP classifier Sequential.
  stats = jax.tree.map(lambda x: x + 0.25, variables['batch_stats'])
  state_dict = cg3d_pth.classifier_state_dict('pointmlp', variables['params'], stats)
  trunk_keys = [
    k for k in pointmlp_state_dict.pointmlp_to_torch(pre['params'], pre_stats) if not k.startswith('projection.')
  ]
  assert list(state_dict)[: len(trunk_keys)] == trunk_keys
  head = torch.nn.Sequential(
    torch.nn.Linear(32, 512),
    torch.nn.BatchNorm1d(512),
    torch.nn.ReLU(),
    torch.nn.Dropout(0.5),
    torch.nn.Linear(512, 256),
    torch.nn.BatchNorm1d(256),
    torch.nn.ReLU(),
    torch.nn.Dropout(0.5),
    torch.nn.Linear(256, 7),
  ).eval()
  head.load_state_dict(
    {k[len('classifier.') :]: v for k, v in state_dict.items() if k.startswith('classifier.')}, strict=True
  )
  assert len(state_dict) == len(trunk_keys) + len(head.state_dict())
  exported = {'params': variables['params'], 'batch_stats': stats}
  logits = classifier.apply(exported, points, train=False)
  pooled = classifier.apply(exported, points, train=False, return_features=True)
  with torch.no_grad():
    torch_logits = head(torch.from_numpy(np.asarray(pooled))).numpy()
  np.testing.assert_allclose(torch_logits, np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_configs():
  from cg3d_jax.configs import finetune_scanobjectnn

  c = finetune_modelnet40.get_config()
  assert (c.model.num_classes, c.train.batch_size, c.model.num_points, c.finetune.fps_points) == (40, 32, 1024, 1200)
  rules = ft.optimizer_rules(c)
  assert rules[1][1]['name'] == 'adamw' and rules[1][1]['lr'] == 2e-4 and rules[1][1]['warmup_epochs'] == 10
  c.model.encoder = 'pointmlp'  # an override switches the recipe with the encoder
  assert ft.optimizer_rules(c)[1][1]['name'] == 'sgd' and ft.optimizer_rules(c)[1][1]['nesterov']
  assert finetune_modelnet40.get_config('pointmlp,modelnet10').model.num_classes == 10
  s = finetune_scanobjectnn.get_config('obj_bg')
  assert (s.data.name, s.model.num_classes, s.data.num_stored_points) == ('obj_bg', 15, 2048)
  assert finetune_scanobjectnn.get_config().data.name == 'pb_t50_rs'
  with pytest.raises(ValueError, match='unknown part'):
    finetune_scanobjectnn.get_config('obj_bgg')
  assert pathlib.Path(ft.__file__).name == 'finetune.py'


def test_interrupted_finetune_resumes_bitwise_through_the_command(modelnet_fixture, tiny_checkpoint, tmp_path, caplog):
  """4 steps straight equal 2 steps in-process, a stop, and the finetune command resuming to 4 (parameters and
  statistics bitwise). The command runs the recipe's final evaluation by augmented voting (2 passes here). The
  command runs in this process; its one cold `python -m` is test_foundation's --help."""

  def config(total):
    return tiny_finetune_config(modelnet_fixture, **{'train.total_steps': total, 'checkpoint.every_steps': 2})

  ft.finetune(config(4), str(tmp_path / 'straight'), init=str(tiny_checkpoint))
  ft.finetune(config(2), str(tmp_path / 'resumed'), init=str(tiny_checkpoint))
  flags = {
    **tiny_finetune_overrides(modelnet_fixture),
    'train.total_steps': 4,
    'checkpoint.every_steps': 2,
    'finetune.votes': 2,
  }
  caplog.set_level('INFO', logger='absl')
  code = run_command(
    finetune.main,
    [
      '--config',
      'finetune_modelnet40',
      '--workdir',
      str(tmp_path / 'resumed'),
      '--init',
      str(tiny_checkpoint),
      '--verbosity=0',  # absl's INFO lines
      *[f'--config.{k}={v}' for k, v in flags.items()],
    ],
  )
  assert code == 0, caplog.text[-3000:]
  assert 'voting (2 passes)' in caplog.text
  a, b = trained.load_finetuned(tmp_path / 'straight'), trained.load_finetuned(tmp_path / 'resumed')
  assert a.step == b.step == 4
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = _read_jsonl(tmp_path / 'resumed' / 'finetune.jsonl')
  assert [r['step'] for r in rows if 'loss' in r] == [2, 4]  # the command started at step 3, not from scratch
  final = rows[-1]
  assert final['step'] == 4 and final['val/count'] == 16 and 0 <= final['val_vote/top1'] <= 1
