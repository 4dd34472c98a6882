"""Library search: exact (chunked matrix products, partial sorts) against the approximate HNSW index, recall@10.

  python bench/bench_search.py [--rows 100000 1000000] [--dim 512] [--queries 100]

For each size: random unit vectors (the hardest case for an approximate index: no clusters) or, with --clusters C,
vectors around C random centres as embeddings of C kinds of shape are, queries drawn the same way; stored float16 as
a library stores them; the exact scan's queries/s; the HNSW index's build time, queries/s and recall@10 against the
exact top 10 at search depths 64, 128 and 256.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax import shape_library  # noqa: E402


def draw(rng, count: int, args) -> np.ndarray:
  """`count` unit vectors: uniform, or around args.clusters fixed centres."""
  x = rng.standard_normal((count, args.dim), dtype=np.float32)
  if args.clusters:
    centres = np.random.default_rng(1).standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(args.clusters, size=count)] + args.spread * x / np.sqrt(args.dim)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, nargs='+', default=[100_000, 1_000_000])
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--queries', type=int, default=100)
  parser.add_argument('--clusters', type=int, default=0, help='0: uniform on the sphere')
  parser.add_argument('--spread', type=float, default=0.5, help='noise norm around a centre (unit centres)')
  args = parser.parse_args()
  print(load.report())
  rng = np.random.default_rng(0)
  for count in args.rows:
    rows, queries = draw(rng, count, args), draw(rng, args.queries, args)
    rows = rows.astype(np.float16)
    start = time.perf_counter()
    _, exact = shape_library.top_k(queries, rows, 10)
    exact_s = time.perf_counter() - start
    kind = f'{args.clusters} clusters, spread {args.spread}' if args.clusters else 'uniform'
    print(f'{count:,} rows x {args.dim} ({kind}): exact {args.queries / exact_s:.1f} queries/s')
    start = time.perf_counter()
    index = shape_library.ApproximateIndex(rows)
    print(f'  HNSW build {time.perf_counter() - start:.1f} s')
    for depth in (64, 128, 256):
      start = time.perf_counter()
      _, found = index.top_k(queries, 10, search_depth=depth)
      seconds = time.perf_counter() - start
      recall = shape_library.recall_at_k(found, exact)
      print(f'  depth {depth}: {args.queries / seconds:.0f} queries/s, recall@10 {recall:.3f}')


if __name__ == '__main__':
  main()
