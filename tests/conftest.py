"""Test session setup: 8 simulated CPU devices, the repository's test fixtures, and shared expensive objects.

XLA_FLAGS must be set before JAX is first imported, so it lives at the very top of this file.
"""

import atexit
import gc
import hashlib
import os
import platform
import shutil
import tempfile

# Two workers share the machine's cores: each computes on one thread (XLA's Eigen kernels, torch's OpenMP), inherited
# by every process a test launches. Oversubscribed, the workers' thread pools spin against each other: a torch + JAX
# subset (step parity, PPAT, PointTransformer; 45 tests, -n 2) took 165 s and 174 s with the defaults and 150 s and
# 151 s single-threaded, interleaved (2026-12-07, AMD EPYC, 2 cores).
SESSION_XLA_FLAGS = ('--xla_force_host_platform_device_count=8', '--xla_cpu_multi_thread_eigen=false')


def session_xla_flags(flags: str) -> str:
  """`flags` with SESSION_XLA_FLAGS in place of any setting of the same names, each named once. The workers import
  this file again with the main process's flags in their environment, and JAX's cache key hashes the flags as
  written: appended twice, a worker's programs were keyed apart from the same programs of a one-process run
  (`pytest tests/test_pretrain.py` compiled again programs a full run had kept)."""
  names = {flag.split('=')[0] for flag in SESSION_XLA_FLAGS}
  return ' '.join([flag for flag in flags.split() if flag.split('=')[0] not in names] + list(SESSION_XLA_FLAGS))


os.environ['XLA_FLAGS'] = session_xla_flags(os.environ.get('XLA_FLAGS', ''))
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests must never reach a hub
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
# Many tests train the same tiny programs again (resume tests run the loop three times, subprocess launches compile
# what the session already compiled), and every run of the suite compiles the same programs as the last: JAX's
# persistent compilation cache keeps them, shared by the workers and every command they launch. Every program is
# cached, however quick to compile: a tiny training run compiles ~235 programs, ~230 of them small eager operations
# (~40 ms each), and each worker and each launched process would otherwise compile them all again (a second process's
# 4-step run went from 15 s to 8 s with them cached; /tmp measurement, 2026-12-06, AMD EPYC, 2 cores).
# The cache outlives the run, in the clone's own pytest cache folder (ignored by git; `pytest --cache-clear` empties
# it): an entry's key is the program itself (its StableHLO, the compile options and XLA flags, the jax and jaxlib
# versions), so an entry is only reused for the identical program, and a rerun after a change recompiles what the
# change touched. A fresh clone (CI) compiles everything once. XLA compiles for the host's vector extensions, which
# the key does not name (JAX's CPU platform version is 'cpu'), so each set of extensions has its own subfolder: a
# clone moved to another processor never runs code built for the last one. Past KEPT_PROGRAMS_BYTES the folder is
# emptied at the next start and fills again.
KEPT_PROGRAMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'd', 'xla')
KEPT_PROGRAMS_BYTES = 2 * 2**30  # a run of the whole suite writes about 90 MB


def host_extensions(cpuinfo_path: str = '/proc/cpuinfo') -> str:
  """A short digest of the processor's feature flags (cpuinfo_path's first `flags` line; without one, the machine and
  processor names)."""
  try:
    with open(cpuinfo_path) as cpuinfo:
      named = next(line for line in cpuinfo if line.startswith('flags'))
  except (OSError, StopIteration):
    named = platform.machine() + platform.processor()
  return hashlib.sha256(named.encode()).hexdigest()[:16]


def kept_programs(root: str, limit: int) -> str:
  """root/<host_extensions()> (created), with root emptied first when its files hold more than `limit` bytes."""
  if sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files) > limit:
    shutil.rmtree(root, ignore_errors=True)
  folder = os.path.join(root, host_extensions())
  os.makedirs(folder, exist_ok=True)
  return folder


# pytest's main process chooses the folder; the workers and every launched command inherit the variable.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = kept_programs(KEPT_PROGRAMS, KEPT_PROGRAMS_BYTES)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import functools  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402

import filelock  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cg3d_jax.step_cost import COMPILE_GC_THRESHOLDS  # noqa: E402

# Python's cyclic collector, at its default thresholds, walked the whole heap of a worker that has imported torch,
# TensorFlow and transformers about once a second while JAX traced: 17.0 s of 130 s in test_step_parity and test_clip
# (12,016 collections, measured with gc.callbacks); at the thresholds training compiles its step with, for the whole
# session, and with the imported modules frozen out of the walk once collection has ended, 4.4 s (139 collections;
# peak RSS 3.5 GB either way; 2026-12-07, AMD EPYC, 2 cores). Reference counting still frees at once everything that
# is not in a cycle, and a full collection closes each module that holds heavy fixtures (GROUPS).
gc.set_threshold(*COMPILE_GC_THRESHOLDS)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / 'tests' / 'fixtures'  # real data the tests check against; tests/fixtures/SOURCES.md


# How the suite is spread over pytest-xdist workers (`--dist loadgroup --no-loadscope-reorder`, README): a module
# named here runs whole on one worker (its module fixtures are built once), in this order, longest first, so that the
# two longest groups start at once on the two workers; every other test is scheduled on its own. The demo group is the
# users of demo_run (built once per run, for both workers), so no worker waits on the other's build.
GROUPS = {
  'test_standalone': 'demo',
  'test_demo': 'demo',
  'test_scenes': 'demo',
  'test_serve_browser': 'demo',
  'test_multihost': 'multihost',
  'test_openshape': 'openshape',
  'test_shipped_configs': 'shipped_configs',
  'test_finetune': 'finetune',
  'test_slip': 'slip',
  'test_clip': 'clip',
  'test_zeroshot': 'zeroshot',
  'test_export': 'export',
  'test_bad_inputs': 'bad_inputs',
  'test_checkpoint': 'checkpoint',
  'test_device_check': 'device_check',
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items):
  order = list(dict.fromkeys(GROUPS.values()))
  for item in items:
    group = GROUPS.get(item.module.__name__.rsplit('.', 1)[-1])
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
  items.sort(
    key=lambda item: order.index(GROUPS[m]) if (m := item.module.__name__.rsplit('.', 1)[-1]) in GROUPS else len(order)
  )


def pytest_collection_finish(session):
  gc.collect()
  gc.freeze()  # the imported modules and the collected tests live for the whole session: no collection walks them


def pytest_runtest_teardown(item, nextitem):
  module = item.module.__name__.rsplit('.', 1)[-1]
  if module in GROUPS and (nextitem is None or nextitem.module is not item.module):
    gc.collect()


@pytest.fixture(scope='session')
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@functools.cache
def modelnet_root() -> pathlib.Path:
  """The fixture ModelNet40 objects in the official layout (modelnet40_normal_resampled/), unpacked once per process
  from their archive into a temporary folder that is removed at exit."""
  target = pathlib.Path(tempfile.mkdtemp(prefix='cg3d_modelnet40_fixture_'))
  atexit.register(shutil.rmtree, target, ignore_errors=True)
  with tarfile.open(FIXTURES / 'modelnet40_normal_resampled.tar.xz') as archive:
    archive.extractall(target, filter='data')
  return target / 'modelnet40_normal_resampled'


def modelnet10_layout(root: pathlib.Path) -> pathlib.Path:
  """The fixture objects ModelNet10 lists (its 10 real test bathtubs) in the official layout under `root`. The
  fixtures hold no ModelNet10 training object: a copy of a real test bathtub stands in as bathtub_0001, the first one
  the training list names."""
  target = root / 'modelnet40_normal_resampled'
  shutil.copytree(modelnet_root(), target, ignore=shutil.ignore_patterns('airplane'))
  shutil.copy(target / 'bathtub' / 'bathtub_0107.txt', target / 'bathtub' / 'bathtub_0001.txt')
  return target


def write_scanobjectnn_h5(path: pathlib.Path, data, label) -> None:
  """One ScanObjectNN h5 file as the official ones are laid out (data, label, and a mask the builder ignores)."""
  import h5py

  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, 'w') as f:
    f['data'] = data
    f['label'] = label
    f['mask'] = np.zeros(data.shape[:2], np.int64)


@pytest.fixture(scope='session')
def modelnet40_prepared(tmp_path_factory) -> str:
  """data_dir of the fixture ModelNet40 objects prepared by the real TFDS builder (skip_bad: the fixtures hold 23 of
  the 12,311 listed objects), once per run for every worker."""
  from cg3d_jax.data import builders

  return str(
    built_once(
      tmp_path_factory,
      'modelnet40_tfds',
      lambda data_dir: builders.get_builder(
        'modelnet40', data_dir=str(data_dir), manual_dir=str(modelnet_root()), skip_bad=True
      ),
    )
  )


@pytest.fixture
def highest_precision():
  """fp32 matmuls at full precision for parity tests (CPU default is already exact; accelerators are not)."""
  with jax.default_matmul_precision('highest'):
    yield


def assert_no_near_ties(scores, relevant, tol: float = 1e-5) -> None:
  """Fails when a relevant item's score lies within `tol` of a non-relevant item's score in the same row.

  The code under test ranks float32 scores with the machine's rounding (~1e-7, depending on vector width and fused
  multiply-add): where a relevant and a non-relevant item are that close, another machine could rank them the
  other way. Reference comparisons of ranks call this on their fixture first, so that they hold on every machine.
  """
  scores = np.asarray(scores, np.float64)
  relevant = np.asarray(relevant, bool)
  for row, rel in zip(scores, relevant):
    if rel.any() and (~rel).any():
      gap = np.abs(row[rel][:, None] - row[~rel][None, :]).min()
      assert gap > tol, f'fixture has a near-tie between a relevant and another item (gap {gap:.1e})'


# Grouping decisions (an FPS argmax, the k-th neighbour) whose competitors are closer than this, relative to the
# distances' scale, could go the other way on another machine: float32 rounding differs by vector width and fused
# multiply-add (XLA contracts a*b+c into an FMA where the CPU has one; numpy and PyTorch's CPU kernels do not).
NEAR_TIE = 1e-5


def grouping_margin(cloud, stages) -> float:
  """The smallest relative gap, in float64, between a choice the point encoders' grouping makes and its runner-up.

  stages: [(num_samples, k), ...]: each stage samples anchors by FPS (as point_ops) from the previous stage's
  anchors (the cloud first) and takes each anchor's k nearest points. Float32 comparisons of two implementations
  on a cloud whose margin exceeds NEAR_TIE group the same points on every machine. Copies of the same point tie
  exactly everywhere and do not count.
  """
  xyz = np.asarray(cloud, np.float64)
  worst = np.inf
  for num_samples, k in stages:
    min_sq = np.full(len(xyz), 1e10)
    chosen = [0]
    for _ in range(1, num_samples):
      min_sq = np.minimum(min_sq, np.sum((xyz - xyz[chosen[-1]]) ** 2, axis=1))
      best = int(np.argmax(min_sq))
      others = min_sq[np.any(xyz != xyz[best], axis=1)]
      if min_sq[best] > 0 and others.size:
        worst = min(worst, (min_sq[best] - others.max()) / min_sq[best])
      chosen.append(best)
    anchors = xyz[chosen]
    if k < len(xyz):
      dist = np.sum((anchors[:, None] - xyz[None]) ** 2, axis=-1)
      order = np.argsort(dist, axis=1, kind='stable')
      rows = np.arange(len(anchors))
      inside, outside = order[:, k - 1], order[:, k]
      distinct = np.any(xyz[inside] != xyz[outside], axis=1)
      scale = np.sum(anchors**2, axis=1) + np.max(np.sum(xyz**2, axis=1))
      gaps = (dist[rows, outside] - dist[rows, inside]) / scale
      worst = min(worst, gaps[distinct].min(initial=np.inf))
    xyz = anchors
  return worst


# Small real artefacts shared by the training, evaluation and export tests: a random transformers CLIP folder with
# the real vocabulary, and a procedural ShapeNet-55-layout dataset prepared by the real TFDS builder.
TINY_CLIP = dict(
  vision_width=32,
  vision_layers=1,
  vision_heads=2,
  patch_size=16,
  image_size=32,
  text_width=32,
  text_layers=1,
  text_heads=2,
  projection_dim=32,
  seed=0,
)


def built_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """The folder `name`, filled by `build(folder)` once per test run: the first pytest-xdist worker that asks builds it
  under a file lock, the other waits and reuses it (as pytest-xdist documents for session fixtures). A build that
  failed halfway leaves no marker, so the next worker that asks builds it again and reports its own failure.

  Users must treat the folder as read-only: workers share it.
  """
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    shared = shared.parent  # this run's folder, above every worker's own
  folder, done = shared / name, shared / f'{name}.built'
  with filelock.FileLock(str(shared / f'{name}.lock')):
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


@pytest.fixture(scope='session')
def tiny_clip_dir(tmp_path_factory):
  from cg3d_jax.synthetic.random_clip import write_random_clip

  folder = built_once(tmp_path_factory, 'tiny_clip', lambda f: write_random_clip(f / 'clip', **TINY_CLIP))
  return str(folder / 'clip')  # the package's own copy of the real BPE vocabulary


@pytest.fixture(scope='session')
def tiny_shapenet(tmp_path_factory):
  """(manual_dir, data_dir) of a prepared procedural ShapeNet-55-layout dataset: 13 families, 6 + 2 objects each."""
  from cg3d_jax.data import builders
  from cg3d_jax.synthetic.objects import SyntheticSettings, ensure_synthetic_shapenet

  def build(root):
    settings = SyntheticSettings(
      seed=0, num_train_per_class=6, num_test_per_class=2, num_points=256, image_size=32, num_views=5
    )
    ensure_synthetic_shapenet(root / 'manual', settings)
    builders.get_builder('shapenet55_cg3d', data_dir=str(root / 'tfds'), manual_dir=str(root / 'manual'))

  root = built_once(tmp_path_factory, 'tiny_shapenet', build)
  return str(root / 'manual'), str(root / 'tfds')


def _tiny_model_overrides() -> dict:
  """tests/configs/tiny_test.py's model sizes as {'model.a.b': value} overrides: runs of other configs at these sizes
  compile the programs the session's cache already holds."""
  from tests.configs import tiny_test

  model = tiny_test.get_config().model
  return {
    'model.embed_dim': model.embed_dim,
    'model.num_points': model.num_points,
    **{f'model.point_transformer.{k}': v for k, v in model.point_transformer.items()},
  }


TINY_MODEL_OVERRIDES = _tiny_model_overrides()


def tiny_config(clip_dir, shapenet, **overrides):
  """tests/configs/tiny_test.py (the demo shrunk for tests) pointed at the fixtures; overrides as {'a.b': value}."""
  from tests.configs import tiny_test

  c = tiny_test.get_config()
  c.clip.path = clip_dir
  c.data.manual_dir, c.data.data_dir = shapenet
  return apply_overrides(c, overrides)


def run_command(main, argv: list[str]) -> int:
  """A command's `main` run in this process as `python -m cg3d_jax.<command> argv` runs it (flags parsed, input
  errors reported on stderr as one `error:` line); returns the exit status."""
  import sys
  from unittest import mock

  from absl import flags

  from cg3d_jax import cli

  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # a previous run's --config.<field> overrides: each parse registers its own
  argv = ['cg3d', *argv]
  try:
    with mock.patch.object(sys, 'argv', argv):  # ml_collections finds --config.<field> overrides in sys.argv
      parsed = cli.parse_flags(argv)
    cli.guard(main)(parsed)
  except SystemExit as stop:
    return stop.code if isinstance(stop.code, int) else 1
  return 0


def apply_overrides(config, overrides: dict):
  """Sets {'a.b.c': value} entries on a ConfigDict (as --config.a.b.c=value would) and returns it."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory, tiny_clip_dir, tiny_shapenet):
  """A training workdir after 4 steps of the tiny config (PointTransformer, deep prompts), checkpoints at steps 2 and
  4. Shared by every worker: copy it before training on from it."""
  from cg3d_jax.training import pretrain

  config = tiny_config(tiny_clip_dir, tiny_shapenet, **{'train.total_steps': 4})
  return built_once(tmp_path_factory, 'tiny_run', lambda workdir: pretrain.train(config, str(workdir)))


def point_features(model, encoder_vars, clouds) -> np.ndarray:
  """model.point_features (cg3d_jax.models.cg3d.CG3D) of clouds after the encoder's farthest-point sampling, jitted as
  the package calls it, on the host. Run eagerly, the two compile each of their hundreds of operations on its own:
  a few seconds per call on a 2-core CPU, for the same numbers."""
  from cg3d_jax.models.point_ops import sample_points

  encode = jax.jit(lambda variables, c: model.point_features(variables, sample_points(c, model.num_points))[0])
  return np.asarray(encode(encoder_vars, jax.numpy.asarray(clouds)))


def tracked_files() -> list[str]:
  done = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, capture_output=True, text=True)
  if done.returncode:
    pytest.fail(f'git ls-files failed in {REPO_ROOT}: {done.stderr.strip()} (these tests need the git checkout)')
  return [name for name in done.stdout.split('\0') if name]


def copy_tracked_files(root: pathlib.Path) -> pathlib.Path:
  """The tracked files copied into <root>/cg3d-jax: no sibling folders, no untracked or ignored files."""
  copy = root / 'cg3d-jax'
  for name in tracked_files():
    target = copy / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / name, target)
  return copy


# The demo recipe shrunk for tests, as `python -m cg3d_jax.demo --override` values. The model sizes repeat
# tiny_test's on purpose (the session's compilation cache then holds these programs): starting from tiny_test would
# also take its 64-example shuffle buffer, and that run learns less (zero-shot top-1 31% instead of 51%, right at
# test_demo's bound) for no time saved.
DEMO_OVERRIDES = {
  'demo.synthetic.num_train_per_class': 8,
  'demo.synthetic.num_test_per_class': 3,
  'demo.synthetic.num_points': 256,
  'demo.synthetic.image_size': 32,
  **{f'demo.clip.{k}': v for k, v in TINY_CLIP.items()},
  **TINY_MODEL_OVERRIDES,
  'data.num_stored_points': 256,
  'train.batch_size': 16,
  'eval.batch_size': 16,
  'train.total_steps': 300,
  'train.encoder_optim.lr': 2e-3,
  'train.log_every': 50,
  'eval.every_steps': 300,
  'checkpoint.every_steps': 300,
  'checkpoint.async_save': False,
  'logging.tensorboard': False,
}


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
  """The whole demo command (`python -m cg3d_jax.demo`, its six steps each a `python -m` of its own) run once, from
  a lone copy of the tracked files (nothing beside it, the copy's own package, another working folder), at the test
  size of DEMO_OVERRIDES (300 steps): the commands a stranger runs first, and the trained demo model the scene and
  zero-shot tests query.

  root: the run's folder; copy: the lone copy; workdir: the demo's --workdir (training run, demo_assets, zeroshot,
  export, scene_query); stdout: what the demo printed; package: the cg3d_jax the demo imported.
  """

  def build(root):
    copy = copy_tracked_files(root / 'lone')
    elsewhere = root / 'elsewhere'
    elsewhere.mkdir()
    # The copy's package comes before the installed one; one CPU device, as a stranger's machine has (the session's
    # 8 simulated devices also make each of the 300 tiny steps ~1.8x slower on 2 cores: 82 ms against 45 ms idle).
    flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ['XLA_FLAGS']).strip()
    env = {**os.environ, 'PYTHONPATH': str(copy), 'XLA_FLAGS': flags}
    found = subprocess.run(
      [sys.executable, '-c', 'import cg3d_jax; print(cg3d_jax.__file__)'],
      cwd=elsewhere,
      env=env,
      capture_output=True,
      text=True,
    )
    (root / 'package.txt').write_text(found.stdout.strip() + found.stderr)
    done = subprocess.run(
      [
        sys.executable,
        '-m',
        'cg3d_jax.demo',
        '--workdir',
        str(root / 'demo'),
        *(f'--override={k}={v}' for k, v in DEMO_OVERRIDES.items()),
      ],
      cwd=elsewhere,
      env=env,
      capture_output=True,
      text=True,
      timeout=1200,
    )
    (root / 'demo_stdout.txt').write_text(done.stdout)
    assert done.returncode == 0, f'the demo failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}'

  root = built_once(tmp_path_factory, 'demo', build)
  return types.SimpleNamespace(
    root=root,
    copy=root / 'lone' / 'cg3d-jax',
    workdir=root / 'demo',
    stdout=(root / 'demo_stdout.txt').read_text(),
    package=(root / 'package.txt').read_text(),
  )


class NeedsCode:
  """A pickled object whose loading would run code (argparse.Namespace, SLIP's and ULIP's `args`, is allowed)."""

  def __reduce__(self):
    return (print, ('ran',))


def refusal(tmp_path, name: str, container, reader) -> str:
  """`container` saved as tmp_path/name and given to `reader`: its CheckpointFormatError, one line naming the file."""
  import torch

  from cg3d_jax.errors import InputError
  from cg3d_jax.weights.cg3d_pth import CheckpointFormatError

  path = tmp_path / name
  torch.save(container, path)
  with pytest.raises(CheckpointFormatError) as err:
    reader(path)
  assert isinstance(err.value, InputError) and str(err.value).startswith(f'{path}: ')
  assert '\n' not in str(err.value)
  return str(err.value)
