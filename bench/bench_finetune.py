"""Benchmark: the fine-tune classifier's training step and evaluation at the real sizes, JAX only.

What `python -m cg3d_jax.finetune --config finetune_modelnet40[,pointmlp]` runs per step (training/finetune.py's
train_step with the recipe's optimizer: FPS 8192 -> 1200, a random 1024, scale/translate, forward + backward,
update) and per evaluation batch (evaluators/classification.make_predict: a single pass, and 10 augmented votes),
on random clouds of `--stored` points, fp32, one device. Compile + first call is reported apart from the median of
the timed calls.

  python bench/bench_finetune.py [--encoders point_transformer,pointmlp] [--batch 8] [--stored 8192] [--iters 3]
"""

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import load  # noqa: E402
from cg3d_jax.configs import finetune_modelnet40  # noqa: E402
from cg3d_jax.data.device_transforms import fps_count  # noqa: E402
from cg3d_jax.evaluators.classification import make_predict  # noqa: E402
from cg3d_jax.models.classifiers import build_classifier, init_variables  # noqa: E402
from cg3d_jax.training import finetune, optim  # noqa: E402

NUM_CLASSES = 40


def timed(fn, iters: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds of `iters` further calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def bench_encoder(encoder: str, *, batch: int, stored: int, iters: int, votes: int) -> dict:
  config = finetune_modelnet40.get_config('pointmlp' if encoder == 'pointmlp' else None)
  model = build_classifier(config.model, NUM_CLASSES)
  variables = init_variables(model, jax.random.key(0), config.model.num_points)
  tx, _ = optim.make_optimizer(finetune.optimizer_rules(config), steps_per_epoch=100, total_steps=30000)
  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    opt_state=tx.init(variables['params']),
    batch_stats=variables['batch_stats'],
    rng=jax.random.key_data(jax.random.key(1)),
  )
  fps_points = fps_count(config.model.num_points, stored, config.finetune.fps_points)
  rng = np.random.default_rng(0)
  points = rng.normal(size=(batch, stored, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  batch_data = {'points': jnp.asarray(points), 'label': jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)}
  step = jax.jit(
    functools.partial(
      finetune.train_step,
      model=model,
      tx=tx,
      num_points=config.model.num_points,
      fps_points=fps_points,
      augment=True,
      label_smoothing=0.0,
    )
  )
  holder = {'state': state}

  def train_call():
    holder['state'], metrics = step(holder['state'], batch_data)
    return metrics

  count = sum(int(np.size(x)) for x in jax.tree.leaves(variables['params']))
  row = {'encoder': encoder, 'parameters': count, 'batch': batch, 'stored': stored}
  row['step_first_s'], row['step_s'] = timed(train_call, iters)
  for name, n in (('eval', 1), (f'eval_{votes}_votes', votes)):
    predict = make_predict(model, num_points=config.model.num_points, fps_points=fps_points, votes=n)
    eval_vars = {'params': holder['state']['params'], 'batch_stats': holder['state']['batch_stats']}
    row[f'{name}_first_s'], row[f'{name}_s'] = timed(
      lambda: predict(eval_vars, batch_data['points'], jax.random.key(2)), iters
    )
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--encoders', default='point_transformer,pointmlp')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--stored', type=int, default=8192, help='points per stored cloud (ModelNet: 8192)')
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--votes', type=int, default=10)
  parser.add_argument('--json', default=None, help='also write the rows here')
  args = parser.parse_args()
  print(load.report())
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}; float32')
  rows = []
  for encoder in args.encoders.split(','):
    row = bench_encoder(encoder, batch=args.batch, stored=args.stored, iters=args.iters, votes=args.votes)
    rows.append(row)
    print(
      f'{encoder}: {row["parameters"]:,} parameters; train step compile+1st {row["step_first_s"]:.1f} s, '
      f'median {row["step_s"]:.2f} s; eval single pass compile+1st {row["eval_first_s"]:.1f} s, median '
      f'{row["eval_s"]:.2f} s; eval {args.votes} votes compile+1st {row[f"eval_{args.votes}_votes_first_s"]:.1f} '
      f's, median {row[f"eval_{args.votes}_votes_s"]:.2f} s  (batch {args.batch}, {args.stored} points)',
      flush=True,
    )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
  main()
