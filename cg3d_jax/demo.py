"""The offline demo in one command: `python -m cg3d_jax.demo --workdir /tmp/cg3d_demo`.

Runs, as separate commands exactly as a user would type them (each is printed first):
  1. python -m cg3d_jax.demo_assets --config demo: a procedural dataset in the ShapeNet-55 layout and a small random
                                  transformers CLIP under <workdir>/demo_assets;
  2. python -m cg3d_jax.train     --config demo, pointed at them: builds the dataset with TFDS, pretrains briefly and
                                  validates zero-shot;
  3. python -m cg3d_jax.evaluate  --config zeroshot_demo: zero-shot on the held-out procedural objects (table,
                                  results.json, per-class CSV/JSON, confusion.png in <workdir>/zeroshot);
  4. python -m cg3d_jax.export    the checkpoint to the original CG3D PyTorch format, reloaded into the PyTorch twin
                                  with strict=True and compared on real ModelNet40 objects (--verify);
  5. python -m cg3d_jax.synthetic_scenes, then python -m cg3d_jax.query_scene: procedural rooms in the S3DIS layout,
                                  and text queries over one of them (summary.json, point_scores.npy, heat PLYs and
                                  top-view PNGs in <workdir>/scene_query).
Rerunning resumes or reuses what is already there. Nothing touches the network.
"""

import os
import shlex
import subprocess
import sys

from absl import flags

from cg3d_jax import cli
from cg3d_jax.errors import InputError

DEFAULT_WORKDIR = '/tmp/cg3d_demo'
flags.adopt_module_key_flags(cli)  # --workdir: where the demo writes everything (default /tmp/cg3d_demo)
STEPS = flags.DEFINE_integer('steps', None, 'Training steps (default: the demo config, 300).')
OVERRIDES = flags.DEFINE_multi_string(
  'override',
  [],
  'A field of the demo config for the asset and training steps, '
  'e.g. --override train.batch_size=16 (repeatable; becomes --config.<field>).',
)

# room_1 of the procedural scenes holds a capsule, a cross and a torus: two of these are there, two are not.
SCENE_QUERIES = 'torus,cross,mug,cone'


def _run(args: list[str]) -> subprocess.CompletedProcess:
  print('\n$ ' + shlex.join(args), flush=True)
  done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
  print(done.stdout, end='', flush=True)
  if done.returncode == 2:  # an input error, which the step has reported as one line below its command
    sys.exit(2)
  if done.returncode:
    raise InputError(f'demo step failed with status {done.returncode}: {shlex.join(args)}')
  return done


def main(argv):
  del argv
  workdir = os.path.abspath(cli.WORKDIR.value or DEFAULT_WORKDIR)
  python = sys.executable
  assets = f'{workdir}/demo_assets'
  config = ['--config', 'demo', *(f'--config.{o}' for o in OVERRIDES.value)]
  paths = _run([python, '-m', 'cg3d_jax.demo_assets', *config, '--root', assets]).stdout.split()
  train = [python, '-m', 'cg3d_jax.train', *config, '--workdir', workdir, *paths]
  if STEPS.value:
    train.append(f'--config.train.total_steps={STEPS.value}')
  _run(train)
  _run(
    [
      python,
      '-m',
      'cg3d_jax.evaluate',
      '--config',
      'zeroshot_demo',
      '--checkpoint',
      workdir,
      f'--config.eval.data_dir={assets}/tfds',
      '--workdir',
      f'{workdir}/zeroshot',
    ]
  )
  _run(
    [python, '-m', 'cg3d_jax.export', '--checkpoint', workdir, '--out', f'{workdir}/export/cg3d_demo.pth', '--verify']
  )
  scenes = f'{assets}/scenes'
  _run([python, '-m', 'cg3d_jax.synthetic_scenes', '--root', scenes])
  _run(
    [
      python,
      '-m',
      'cg3d_jax.query_scene',
      '--checkpoint',
      workdir,
      '--scene',
      f'{scenes}/Stanford3dDataset_v1.2_Aligned_Version/Area_5/room_1',
      '--queries',
      SCENE_QUERIES,
      '--radius',
      '0.6',
      '--exclude_floor',
      '--out',
      f'{workdir}/scene_query',
    ]
  )
  print(
    f'\ndemo finished: zero-shot results in {workdir}/zeroshot, PyTorch export in {workdir}/export, '
    f'scene query outputs in {workdir}/scene_query'
  )


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
