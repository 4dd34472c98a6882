"""Preemption, measured: training killed with SIGKILL at random moments (some during an asynchronous checkpoint
write) and resumed each time ends bitwise where an uninterrupted run ends.

  python bench/bench_preemption.py [--kills 5] [--steps 24] [--every 3] [--seed 0] [--json out.json]

Both runs are `python -m cg3d_jax.train --config tests/configs/tiny_test.py` (the tests' tiny model, asynchronous
checkpoints every --every steps) on the demo's procedural data and a small random CLIP, written first into a temporary
folder. The interrupted run is started, killed, restarted in the same workdir, ... --kills times, then left to finish.
Moments: about a third are "during a save" (the kill lands as soon as orbax's temporary step folder appears), the others
"mid-training" (after a random number of newly logged steps plus a random delay). Each restart resumes from the newest
intact checkpoint; the steps it runs again are reported. At the end every array of the final state (parameters,
optimizer state, batch statistics, counters) of both runs is compared bit for bit, and the metric rows of train.jsonl
are checked for duplicates and compared by loss."""

import argparse
import json
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import load  # noqa: E402

# The demo CLIP shrunk to the tiny config's sizes (the tests' TINY_CLIP).
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
)
TINY_DATA = {
  'demo.synthetic.num_train_per_class': 2,
  'demo.synthetic.num_test_per_class': 1,
  'demo.synthetic.num_points': 256,
  'demo.synthetic.image_size': 32,
  'model.embed_dim': 32,
}


def _assets(root: pathlib.Path) -> list[str]:
  args = [
    sys.executable,
    '-m',
    'cg3d_jax.demo_assets',
    '--config',
    'demo',
    '--root',
    str(root),
    *(f'--config.{k}={v}' for k, v in TINY_DATA.items()),
    *(f'--config.demo.clip.{k}={v}' for k, v in TINY_CLIP.items()),
  ]
  done = subprocess.run(args, capture_output=True, text=True, check=True)
  return done.stdout.split()  # --config.clip.path=... --config.data.manual_dir=... --config.data.data_dir=...


def _train_args(workdir: pathlib.Path, paths: list[str], steps: int, every: int) -> list[str]:
  return [
    sys.executable,
    '-m',
    'cg3d_jax.train',
    '--config',
    str(pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'configs' / 'tiny_test.py'),
    '--workdir',
    str(workdir),
    *paths,
    f'--config.train.total_steps={steps}',
    '--config.train.log_every=1',
    f'--config.checkpoint.every_steps={every}',
    '--config.checkpoint.async_save=True',
    '--config.checkpoint.keep=2',
  ]


def _logged_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / 'train.jsonl'
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)['step'])
    except (ValueError, KeyError):  # a line the kill cut short
      pass
  return steps


def _partial_saves(workdir: pathlib.Path) -> set[str]:
  """orbax's temporary step folders: a save being written (or one a kill cut short, until the restart clears it)."""
  folder = workdir / 'checkpoints'
  return {p.name for p in folder.iterdir() if 'orbax-checkpoint-tmp' in p.name} if folder.is_dir() else set()


def _run_and_kill(args, workdir: pathlib.Path, kind: str, rng: random.Random, timeout: float = 600) -> dict:
  """Starts training; kills it at a `kind` moment; returns what happened (None kill if it finished first)."""
  log = open(workdir.parent / f'{workdir.name}.log', 'a')
  before = max(_logged_steps(workdir), default=0)
  target_rows = rng.randint(1, 4)
  delay = rng.uniform(0.0, 1.0)
  proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
  start = time.time()
  killed_at = None
  stale = _partial_saves(workdir)
  while proc.poll() is None and time.time() - start < timeout:
    new = [s for s in _logged_steps(workdir) if s > before]
    saving = bool(_partial_saves(workdir) - stale)
    if kind == 'during a save' and new and saving:
      killed_at = 'save in progress'
    elif kind == 'mid-training' and len(new) >= target_rows:
      time.sleep(delay)
      killed_at = f'{delay:.2f} s after step {max(new)} was logged'
    if killed_at:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      logged = max(_logged_steps(workdir), default=0)
      return {
        'kind': kind,
        'killed': killed_at,
        'save_in_progress': saving,
        'last_logged_step': logged,
        'partial_saves_left': sorted(_partial_saves(workdir)),
      }
    time.sleep(0.02)
  proc.wait()
  return {'kind': kind, 'killed': None, 'last_logged_step': max(_logged_steps(workdir), default=0)}


def _resumed_step(workdir: pathlib.Path) -> list[int]:
  text = (workdir.parent / f'{workdir.name}.log').read_text()
  return [int(m) for m in re.findall(r'resumed from step (\d+)', text)]


def _final_state(workdir: pathlib.Path):
  import jax

  from cg3d_jax import checkpoints

  saved = checkpoints.read_step(workdir)
  return saved.step, {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(saved.state)[0]
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=5)
  parser.add_argument('--steps', type=int, default=24)
  parser.add_argument('--every', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  print(load.report(), flush=True)
  rng = random.Random(args.seed)
  kinds = ['during a save'] * max(1, args.kills // 3 + 1) + ['mid-training'] * args.kills
  kinds = kinds[: args.kills]
  rng.shuffle(kinds)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    paths = _assets(tmp / 'assets')
    t0 = time.time()
    reference = tmp / 'uninterrupted'
    subprocess.run(_train_args(reference, paths, args.steps, args.every), check=True, capture_output=True)
    reference_s = time.time() - t0

    interrupted = tmp / 'interrupted'
    events = []
    t0 = time.time()
    for kind in kinds:
      events.append(_run_and_kill(_train_args(interrupted, paths, args.steps, args.every), interrupted, kind, rng))
      print(f'kill {len(events)}: {events[-1]}', flush=True)
    finish = _run_and_kill(_train_args(interrupted, paths, args.steps, args.every), interrupted, 'finish', rng)
    interrupted_s = time.time() - t0
    resumed = _resumed_step(interrupted)
    for event, step in zip(events, resumed):
      event['resumed_from'] = step
      event['steps_redone'] = event['last_logged_step'] - step
    step_a, state_a = _final_state(reference)
    step_b, state_b = _final_state(interrupted)
    equal = (
      step_a == step_b
      and state_a.keys() == state_b.keys()
      and all(
        state_a[k].dtype == state_b[k].dtype and np.array_equal(state_a[k], state_b[k], equal_nan=True) for k in state_a
      )
    )
    different = [k for k in state_a if k in state_b and not np.array_equal(state_a[k], state_b[k], equal_nan=True)]
    rows_a, rows_b = _logged_steps(reference), _logged_steps(interrupted)
    losses = {}
    for name in ('uninterrupted', 'interrupted'):
      rows = map(json.loads, (tmp / name / 'train.jsonl').read_text().splitlines())
      losses[name] = {row['step']: row.get('loss') for row in rows}
  result = {
    'machine': load.report(),
    'steps': args.steps,
    'checkpoint_every': args.every,
    'kills': events,
    'finished_after_kills': finish['killed'] is None,
    'final_step': [step_a, step_b],
    'arrays_compared': len(state_a),
    'bitwise_equal': bool(equal),
    'differing_arrays': different[:10],
    'steps_redone_total': sum(e.get('steps_redone', 0) for e in events),
    'metric_rows_duplicated': len(rows_b) - len(set(rows_b)),
    'metric_rows': [len(rows_a), len(rows_b)],
    'logged_losses_equal': losses['uninterrupted'] == losses['interrupted'],
    'wall_s': {'uninterrupted': round(reference_s, 1), 'interrupted_with_restarts': round(interrupted_s, 1)},
  }
  print(json.dumps(result, indent=1))
  print(
    f'\n{len(events)} SIGKILLs ({sum(e["kind"] == "during a save" for e in events)} during an async save): '
    f'{result["steps_redone_total"]} steps redone in all; final state '
    f'{"bitwise EQUAL" if equal else "DIFFERENT"} to the uninterrupted run over {len(state_a)} arrays; '
    f'{result["metric_rows_duplicated"]} duplicated metric rows; logged losses equal: '
    f'{result["logged_losses_equal"]}'
  )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return 0 if equal and result['metric_rows_duplicated'] == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
