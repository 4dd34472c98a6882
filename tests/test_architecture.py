"""The package's import directions (docs/architecture.md's table) and its lint configuration hold."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / 'cg3d_jax'
CONFIGS = REPO_ROOT / 'configs'  # installed as cg3d_jax.configs (pyproject.toml's package-dir)
COMMANDS = {
  'train',
  'finetune',
  'evaluate',
  'predict',
  'export',
  'demo',
  'demo_assets',
  'query_scene',
  'evaluate_scenes',
  'build_data',
  'synthetic_scenes',
  'embed',
  'search',
  'serve',
}


def allowed_imports() -> dict[str, set[str]]:
  """{unit: the units it may import}, from the table in docs/architecture.md."""
  text = (REPO_ROOT / 'docs' / 'architecture.md').read_text()
  rules = {}
  for line in text.splitlines():
    match = re.fullmatch(r'\| ([a-z_, ]+) \| ([a-z_, ]+) \|', line.strip())
    if not match or match.group(1) == 'unit':
      continue
    units = [u.strip() for u in match.group(1).split(',')]
    targets = match.group(2).strip()
    allowed = set() if targets == 'nothing of the package' else {t.strip() for t in targets.split(',')}
    for unit in units:
      rules[unit] = allowed
  return rules


def unit_of(module: str) -> str:
  """'cg3d_jax.training.pretrain' -> 'training'; 'cg3d_jax.evaluate' -> 'commands'."""
  name = module.split('.')[1]
  return 'commands' if name in COMMANDS else name


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every cg3d_jax module a file imports, at any depth (function-level imports too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('cg3d_jax'):
      parts = node.module.split('.')
      found |= {f'{node.module}.{a.name}' for a in node.names} if len(parts) == 1 else {node.module}
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('cg3d_jax')}
  return found


def test_the_table_covers_every_unit_of_the_package():
  rules = allowed_imports()
  units = {
    p.stem if p.is_file() else p.name
    for p in PACKAGE.iterdir()
    if (p.suffix == '.py' and p.stem != '__init__') or (p.is_dir() and (p / '__init__.py').is_file())
  }
  units = {'commands' if u in COMMANDS else u for u in units} | {'configs'}
  assert units == set(rules), f'units without a rule: {units - set(rules)}; rules without a unit: {set(rules) - units}'


def test_imports_run_one_way():
  rules = allowed_imports()
  offences = []
  package = {'.'.join(p.relative_to(REPO_ROOT).with_suffix('').parts): p for p in PACKAGE.rglob('*.py')}
  package |= {f'cg3d_jax.configs.{p.stem}': p for p in CONFIGS.glob('*.py')}
  for module, path in sorted(package.items()):
    source = unit_of(module) if module.count('.') else None
    if source is None:
      continue
    for target in imported_modules(path):
      target_unit = unit_of(target)
      if source == 'commands':
        if target_unit == 'commands' and target.split('.')[1] != module.split('.')[1]:
          offences.append(f'{module} imports the command {target}')
      elif target_unit != source and target_unit not in rules[source]:
        offences.append(f'{module} ({source}) imports {target} ({target_unit})')
  assert not offences, '\n'.join(offences)


def test_a_forbidden_import_is_caught(tmp_path):
  """The check itself can fail: an evaluator importing the training package is an offence."""
  rules = allowed_imports()
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from cg3d_jax.training import pretrain\n')
  targets = {unit_of(t) for t in imported_modules(bad)}
  assert targets == {'training'} and 'training' not in rules['evaluators']


def test_ruff_lints_and_formats_the_whole_tree():
  """`ruff check` (lint) and `ruff format --check` (the project's format: 2-space indents, single quotes, 120
  columns; pyproject.toml) are clean over the package, the configs, the tests and the benchmarks."""
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.fail('ruff is not installed (pip install -r requirements.txt installs the test extra)')
  for command in (['check'], ['format', '--check']):
    done = subprocess.run(
      [ruff, *command, 'cg3d_jax', 'configs', 'tests', 'bench'], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, (command, done.stdout[-3000:] + done.stderr[-1000:])


# The modules that read TFDS (and the two benchmarks that measure them), and so import TensorFlow. Nothing else may:
# GPU images (and users who evaluate on OpenShape's files) have no TensorFlow, and importing it costs a command 6 s.
TENSORFLOW_MODULES = {
  'cg3d_jax.data.builder_base',
  'cg3d_jax.data.builders',
  'cg3d_jax.data.modelnet',
  'cg3d_jax.data.pipeline',
  'cg3d_jax.data.scanobjectnn',
  'cg3d_jax.data.shapenet55',
  'cg3d_jax.data.sources.tfds_layout',
  'cg3d_jax.data.tf_transforms',
  'cg3d_jax.training.finetune',
  'bench.bench_pipeline',
  'bench.bench_finetune',
}
_IMPORT_EVERYTHING = """
import importlib, json, pathlib, pkgutil, sys

class NoTensorFlow:  # as if tensorflow and tensorflow_datasets were not installed
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)

sys.meta_path.insert(0, NoTensorFlow())
import cg3d_jax
names = [m.name for m in pkgutil.walk_packages(cg3d_jax.__path__, 'cg3d_jax.')]
names += [m.name for m in pkgutil.walk_packages(cg3d_jax.configs.__path__, 'cg3d_jax.configs.')]  # configs/
names += sorted(f'bench.{p.stem}' for p in pathlib.Path('bench').glob('*.py') if p.stem != '__init__')
needs = []
for name in names:
  try:
    importlib.import_module(name)
  except ModuleNotFoundError as e:
    if not str(e).endswith('(blocked)'):
      raise
    needs.append(name)
print(json.dumps({'imported': [n for n in names if n not in needs], 'needs_tensorflow': needs}))
"""


def test_every_module_imports_in_one_process_and_tensorflow_only_where_tfds_is_read():
  """One process imports every module of the package (each command among them) and every benchmark, with
  tensorflow and tensorflow_datasets blocked: absl flags are global, so a flag two commands share must be defined
  once (cli) or importing both fails; and exactly TENSORFLOW_MODULES fail for want of TensorFlow (the models, the
  training and evaluation steps, the OpenShape stream and evaluation sets, predict, export, query_scene and the
  other benchmarks import without it). Shown to fail with `import tensorflow as tf` put back at the top of
  data/device_transforms.py (the training step and the modules that import it are then listed)."""
  import json

  done = subprocess.run(
    [sys.executable, '-c', _IMPORT_EVERYTHING], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert set(result['needs_tensorflow']) == TENSORFLOW_MODULES
  imported = set(result['imported'])
  assert {f'cg3d_jax.{c}' for c in COMMANDS} <= imported
  assert {
    'cg3d_jax.training.pretrain_step',
    'cg3d_jax.training.pretrain',
    'cg3d_jax.data.openshape_stream',
    'cg3d_jax.data.sources.source',
    'cg3d_jax.data.sources.openshape_layout',
    'cg3d_jax.training.recipes.recipe',
    'cg3d_jax.training.recipes.stored_features',
    'cg3d_jax.models.cg3d',
    'bench.bench_accelerator',
  } <= imported
