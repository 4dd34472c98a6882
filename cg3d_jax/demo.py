"""The offline demo in one command: `python -m cg3d_jax.demo --workdir /tmp/cg3d_demo`.

Runs, as separate commands exactly as a user would type them (each is printed first):
  1. python -m cg3d_jax.train     --config demo: writes a procedural dataset in the ShapeNet-55 layout and a small
                                  random transformers CLIP under <workdir>/demo_assets, builds the dataset with TFDS,
                                  pretrains briefly and validates zero-shot;
  2. python -m cg3d_jax.evaluate  --config zeroshot_demo: zero-shot on the held-out procedural objects (table,
                                  results.json, per-class CSV/JSON, confusion.png in <workdir>/zeroshot);
  3. python -m cg3d_jax.export    the checkpoint to the original CG3D PyTorch format, reloaded into the PyTorch twin
                                  with strict=True and compared on real ModelNet40 objects (--verify);
  4. python -m cg3d_jax.data.synthetic_scenes, then python -m cg3d_jax.query_scene: procedural rooms in the S3DIS
                                  layout, and text queries over one of them (summary.json, point_scores.npy, heat
                                  PLYs and top-view PNGs in <workdir>/scene_query).
Rerunning resumes or reuses what is already there. Nothing touches the network.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags

from cg3d_jax import cli

WORKDIR = flags.DEFINE_string('workdir', '/tmp/cg3d_demo', 'Where the demo writes everything.')
STEPS = flags.DEFINE_integer('steps', None, 'Training steps (default: the demo config, 300).')

# room_1 of the procedural scenes holds a capsule, a cross and a torus: two of these are there, two are not.
SCENE_QUERIES = 'torus,cross,mug,cone'


def _run(args: list[str]) -> None:
  print('\n$ ' + shlex.join(args), flush=True)
  done = subprocess.run(args)
  if done.returncode:
    sys.exit(f'error: demo step failed with status {done.returncode}: {shlex.join(args)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = os.path.abspath(WORKDIR.value)
  python = sys.executable
  train = [python, '-m', 'cg3d_jax.train', '--config', 'demo', '--workdir', workdir]
  if STEPS.value:
    train.append(f'--config.train.total_steps={STEPS.value}')
  _run(train)
  _run([python, '-m', 'cg3d_jax.evaluate', '--config', 'zeroshot_demo', '--checkpoint', workdir,
        f'--config.eval.data_dir={workdir}/demo_assets/tfds', '--workdir', f'{workdir}/zeroshot'])
  _run([python, '-m', 'cg3d_jax.export', '--checkpoint', workdir, '--out', f'{workdir}/export/cg3d_demo.pth',
        '--verify'])
  scenes = f'{workdir}/demo_assets/scenes'
  _run([python, '-m', 'cg3d_jax.data.synthetic_scenes', '--root', scenes])
  _run([python, '-m', 'cg3d_jax.query_scene', '--checkpoint', workdir, '--scene',
        f'{scenes}/Stanford3dDataset_v1.2_Aligned_Version/Area_5/room_1', '--queries', SCENE_QUERIES,
        '--radius', '0.6', '--exclude_floor', '--out', f'{workdir}/scene_query'])
  print(f'\ndemo finished: zero-shot results in {workdir}/zeroshot, PyTorch export in {workdir}/export, '
        f'scene query outputs in {workdir}/scene_query')


def run() -> None:
  """The console script's entry point."""
  cli.run(main)


if __name__ == '__main__':
  run()
