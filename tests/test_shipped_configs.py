"""Every shipped config runs: each config name (and each of its args) is run by its command at a tiny size on
procedural or fixture data, here or in the test named beside it in SHIPPED, so a config that no longer builds, trains
or evaluates fails the suite instead of a user.

The runs here shrink only the sizes (model width and depth, batch, steps, points stored); what distinguishes each
config (its arg's split, encoder, point count, template set, dataset, layout) is kept and checked in what the command
wrote.
"""

import json
import pathlib

import numpy as np
import pytest

from cg3d_jax import checkpoints, evaluate, finetune, train
from cg3d_jax.data import openshape_stream, scanobjectnn
from cg3d_jax.metric_writer import read_jsonl
from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
from tests.conftest import REPO_ROOT, TINY_MODEL_OVERRIDES, modelnet10_layout, run_command, write_scanobjectnn_h5

# Where each shipped config (name or name:arg) runs. A new config file, or a new arg, must be added here.
SHIPPED = {
  'base': 'the base of every config; run through each of them',
  'demo': 'conftest.demo_run (the demo command)',
  'zeroshot_demo': 'conftest.demo_run (the demo command)',
  'pretrain_pointbert': 'tests/test_shipped_configs.py (as :8192: the same recipe with 1,024 points)',
  'pretrain_pointbert:8192': 'tests/test_shipped_configs.py',
  'pretrain_pointmlp': 'tests/test_shipped_configs.py',
  'pretrain_openshape': 'tests/test_openshape.py::test_a_stored_feature_run_learns_and_scores_on_each_layout',
  'pretrain_openshape:no_lvis': 'tests/test_shipped_configs.py',
  'pretrain_openshape:shapenet': 'tests/test_shipped_configs.py',
  'pretrain_openshape:renders': 'tests/test_openshape.py::test_renders_train_the_prompts_through_the_image_tower',
  'zeroshot_modelnet40': 'tests/test_zeroshot.py::test_evaluate_command_on_modelnet40_fixture',
  'zeroshot_modelnet40:original': 'tests/test_slip.py::test_original_pth_evaluates_zero_shot_with_the_original_'
  'protocol',
  'zeroshot_modelnet40:ulip': 'tests/test_shipped_configs.py',
  'zeroshot_modelnet10': 'tests/test_shipped_configs.py',
  'zeroshot_modelnet10:ulip': 'tests/test_shipped_configs.py',
  'zeroshot_scanobjectnn:obj_bg': 'tests/test_zeroshot.py::test_scanobjectnn_variant_through_evaluate',
  'zeroshot_scanobjectnn:pb_t50_rs,ulip': 'tests/test_shipped_configs.py',
  'zeroshot_objaverse_lvis': 'tests/test_openshape.py::test_a_stored_feature_run_learns_and_scores_on_each_layout',
  'zeroshot_objaverse_lvis:names': 'tests/test_openshape.py::test_a_stored_feature_run_learns_and_scores_on_each_'
  'layout',
  'zeroshot_objaverse_lvis:uni3d': 'tests/test_shipped_configs.py',
  'zeroshot_openshape:modelnet40': 'tests/test_openshape.py::test_a_stored_feature_run_learns_and_scores_on_each_'
  'layout',
  'zeroshot_openshape:scanobjectnn': 'tests/test_shipped_configs.py',
  'retrieval_shapenet55': 'tests/test_zeroshot.py::test_retrieval_and_zero_shot_on_tiny_shapenet',
  'finetune_modelnet40': 'tests/test_finetune.py (every fine-tuning test)',
  'finetune_scanobjectnn': 'tests/test_shipped_configs.py',
}

TINY_MODEL = TINY_MODEL_OVERRIDES
QUICK = {
  'train.total_steps': 1,
  'train.log_every': 1,
  'eval.every_steps': 0,
  'checkpoint.async_save': False,
  'logging.tensorboard': False,
}


def _flags(values: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in values.items()]


def _train_log(workdir) -> list[dict]:
  return [row for row in read_jsonl(str(pathlib.Path(workdir) / 'train.jsonl')) if 'loss' in row]


def test_every_shipped_config_file_is_listed():
  files = {p.stem for p in (REPO_ROOT / 'configs').glob('*.py')} - {'__init__'}
  assert files == {name.split(':')[0] for name in SHIPPED}
  named_here = [name for name, where in SHIPPED.items() if where == 'tests/test_shipped_configs.py']
  assert SHIPPED['pretrain_pointbert'].startswith('tests/test_shipped_configs.py (as :8192')
  assert sorted(named_here) == sorted(RUN_HERE)


@pytest.fixture(scope='module')
def openshape_root(tmp_path_factory):
  return write_openshape_layout(
    tmp_path_factory.mktemp('openshape'),
    train_per_class=4,
    lvis_per_class=1,
    num_points=256,
    feature_dim=TINY_MODEL['model.embed_dim'],
  )


@pytest.fixture(scope='module')
def scanobjectnn_h5(tmp_path_factory):
  """ScanObjectNN's PB_T50_RS files under their official names: 16 training and 6 test clouds of 2,048 points."""
  root = tmp_path_factory.mktemp('scanobjectnn')
  rng = np.random.default_rng(0)
  folder, train_name, test_name = scanobjectnn.FILES['pb_t50_rs']
  for name, n in ((train_name, 16), (test_name, 6)):
    write_scanobjectnn_h5(
      root / folder / name, rng.normal(size=(n, 2048, 3)).astype(np.float32), np.arange(n, dtype=np.int64) % 15
    )
  return root


@pytest.fixture(scope='module')
def modelnet10_raw(tmp_path_factory):
  return modelnet10_layout(tmp_path_factory.mktemp('modelnet10'))


def _pretrain(config, workdir, **extra):
  return run_command(train.main, ['--config', config, '--workdir', str(workdir), *_flags({**QUICK, **extra})])


def _evaluate(config, checkpoint, workdir, **extra) -> dict:
  assert (
    run_command(
      evaluate.main,
      [
        '--config',
        config,
        '--checkpoint',
        str(checkpoint),
        '--workdir',
        str(workdir),
        '--config.eval.batch_size=8',
        *_flags(extra),
      ],
    )
    == 0
  )
  return json.loads((pathlib.Path(workdir) / 'results.json').read_text())


def test_pretrain_pointbert_at_8192_points(tiny_clip_dir, tiny_shapenet, tmp_path):
  manual, data_dir = tiny_shapenet
  tiny = {k: v for k, v in TINY_MODEL.items() if k != 'model.num_points'}  # the arg's point count is the test
  assert (
    _pretrain(
      'pretrain_pointbert:8192',
      tmp_path / 'run',
      **tiny,
      **{
        'clip.path': tiny_clip_dir,
        'data.manual_dir': manual,
        'data.data_dir': data_dir,
        'data.num_stored_points': 8192,
        'train.batch_size': 8,
      },
    )
    == 0
  )
  (row,) = _train_log(tmp_path / 'run')
  assert row['step'] == 1 and np.isfinite(row['loss'])
  assert checkpoints.read_config(tmp_path / 'run', 1).model.num_points == 8192


def test_pretrain_pointmlp(tiny_clip_dir, tiny_shapenet, tmp_path):
  manual, data_dir = tiny_shapenet
  mlp = dict(
    embed_dim=8, dim_expansion=(2, 2), pre_blocks=(1, 1), pos_blocks=(1, 1), k_neighbors=(4, 4), reducers=(2, 2)
  )
  assert (
    _pretrain(
      'pretrain_pointmlp',
      tmp_path / 'run',
      **{
        'clip.path': tiny_clip_dir,
        'data.manual_dir': manual,
        'data.data_dir': data_dir,
        'model.embed_dim': 32,
        'model.num_points': 64,
        'data.num_stored_points': 256,
        'train.batch_size': 8,
        **{f'model.pointmlp.{k}': v for k, v in mlp.items()},
      },
    )
    == 0
  )
  (row,) = _train_log(tmp_path / 'run')
  assert np.isfinite(row['loss'])
  saved = checkpoints.read_config(tmp_path / 'run', 1)
  assert saved.model.encoder == 'pointmlp' and saved.train.encoder_optim.lr == 1e-4  # the recipe's, not the base's


def _openshape_run(arg, root, workdir):
  assert (
    _pretrain(
      f'pretrain_openshape:{arg}',
      workdir,
      **TINY_MODEL,
      **{'data.manual_dir': root, 'data.num_stored_points': 256, 'train.batch_size': 8},
    )
    == 0
  )
  return workdir


@pytest.fixture(scope='module')
def stored_feature_run(openshape_root, tmp_path_factory):
  """One step of pretrain_openshape:no_lvis: the checkpoint the OpenShape-layout evaluations below score."""
  return _openshape_run('no_lvis', openshape_root, tmp_path_factory.mktemp('no_lvis'))


@pytest.mark.parametrize(
  'arg, split, datasets',
  [('no_lvis', 'train_no_lvis', {'Objaverse', 'ShapeNet'}), ('shapenet', 'train_shapenet_only', {'ShapeNet'})],
)
def test_pretrain_openshape_splits(stored_feature_run, openshape_root, tmp_path, arg, split, datasets):
  workdir = stored_feature_run if arg == 'no_lvis' else _openshape_run(arg, openshape_root, tmp_path / 'run')
  (row,) = _train_log(workdir)
  assert np.isfinite(row['loss'])
  assert checkpoints.read_config(workdir, 1).data.train_split == split
  entries = json.loads((openshape_root / openshape_stream.TRAIN_SPLITS[split]).read_text())
  assert {entry['dataset'] for entry in entries} == datasets


def test_zeroshot_openshape_scanobjectnn(stored_feature_run, openshape_root, tmp_path):
  results = _evaluate(
    'zeroshot_openshape:scanobjectnn',
    stored_feature_run,
    tmp_path / 'eval',
    **{'eval.manual_dir': openshape_root, 'eval.num_stored_points': 256},
  )
  stored = np.load(openshape_root / 'meta_data' / 'scanobjectnn' / 'xyz_label.npy', allow_pickle=True).item()
  assert results['num_objects'] == len(stored['label']) and results['num_classes'] == 15
  assert results['prompts'] == 'precomputed'


def test_zeroshot_objaverse_lvis_uni3d(stored_feature_run, openshape_root, tiny_clip_dir, tmp_path):
  """Uni3D's list: ids from lvis_testset.txt, stored axes, 64 templates through a CLIP (no precomputed table)."""
  results = _evaluate(
    'zeroshot_objaverse_lvis:uni3d',
    stored_feature_run,
    tmp_path / 'eval',
    **{'eval.manual_dir': openshape_root, 'eval.num_stored_points': 256, 'clip.path': tiny_clip_dir},
  )
  listed = (openshape_root / 'lvis_testset.txt').read_text().split()
  assert results['num_objects'] == len(listed) and results['prompts'] == 'templates'
  assert results['y_up_swapped'] is False and results['clip']['path'] == tiny_clip_dir


def test_zeroshot_modelnet40_ulip(tiny_checkpoint, modelnet40_prepared, tmp_path):
  results = _evaluate(
    'zeroshot_modelnet40:ulip', tiny_checkpoint, tmp_path / 'eval', **{'eval.data_dir': modelnet40_prepared}
  )
  assert results['templates'] == 'ulip' and results['num_objects'] == 20


@pytest.mark.parametrize('arg, templates', [('', 'cg3d_zeroshot'), (':ulip', 'ulip')])
def test_zeroshot_modelnet10(tiny_checkpoint, modelnet10_raw, tmp_path, arg, templates):
  results = _evaluate(
    f'zeroshot_modelnet10{arg}',
    tiny_checkpoint,
    tmp_path / 'eval',
    **{'eval.manual_dir': modelnet10_raw, 'eval.data_dir': tmp_path / 'tfds', 'eval.skip_bad': True},
  )
  listed = (modelnet10_raw / 'modelnet10_test.txt').read_text().split()
  present = [s for s in listed if (modelnet10_raw / s.rsplit('_', 1)[0] / f'{s}.txt').is_file()]
  assert results['templates'] == templates and results['num_objects'] == len(present) == 10
  assert results['num_classes'] == 10


def test_zeroshot_scanobjectnn_with_ulip_templates(tiny_checkpoint, scanobjectnn_h5, tmp_path):
  results = _evaluate(
    'zeroshot_scanobjectnn:pb_t50_rs,ulip',
    tiny_checkpoint,
    tmp_path / 'eval',
    **{'eval.manual_dir': scanobjectnn_h5, 'eval.data_dir': tmp_path / 'tfds'},
  )
  assert results['templates'] == 'ulip' and results['num_objects'] == 6 and results['num_classes'] == 15


def test_finetune_scanobjectnn(tiny_checkpoint, scanobjectnn_h5, tmp_path):
  overrides = {
    'data.manual_dir': scanobjectnn_h5,
    'data.data_dir': tmp_path / 'tfds',
    'data.num_stored_points': 128,
    'data.shuffle_buffer': 16,
    **TINY_MODEL,
    'finetune.fps_points': 80,
    'finetune.votes': 1,
    'finetune.eval_every_epochs': 0,
    'train.batch_size': 8,
    'eval.batch_size': 8,
    **QUICK,
  }
  overrides.pop('eval.every_steps')
  assert (
    run_command(
      finetune.main,
      [
        '--config',
        'finetune_scanobjectnn',
        '--workdir',
        str(tmp_path / 'run'),
        '--init',
        str(tiny_checkpoint),
        *_flags(overrides),
      ],
    )
    == 0
  )
  rows = list(read_jsonl(str(tmp_path / 'run' / 'finetune.jsonl')))
  assert [r['step'] for r in rows if 'loss' in r] == [1] and np.isfinite(rows[0]['loss'])
  assert rows[-1]['val/count'] == 6  # the test split's clouds, all 15-way
  assert checkpoints.read_config(tmp_path / 'run', 1).model.num_classes == 15


RUN_HERE = [
  'pretrain_pointbert:8192',
  'pretrain_pointmlp',
  'pretrain_openshape:no_lvis',
  'pretrain_openshape:shapenet',
  'zeroshot_openshape:scanobjectnn',
  'zeroshot_objaverse_lvis:uni3d',
  'zeroshot_modelnet40:ulip',
  'zeroshot_modelnet10',
  'zeroshot_modelnet10:ulip',
  'zeroshot_scanobjectnn:pb_t50_rs,ulip',
  'finetune_scanobjectnn',
]
