"""Mixed precision, shown: bfloat16 compute with float32 parameters, optimizer state, LayerNorm/BatchNorm statistics,
softmax, logits and losses (the models' `dtype`; the state stays float32, tests/test_point_transformer.py checks).

  python bench/bench_bf16.py [--part features|demo|both] [--workdir /tmp/cg3d_bf16] [--json out.json]

features: the real-size PointTransformer (22 M parameters, random weights) on real ModelNet40 objects (the test
  fixture's clouds, 1024 points by FPS from 8192 of each file's 10,000), float32 vs bfloat16 compute: cosine of the
  projected features per object.
demo: the demo (`python -m cg3d_jax.demo`, 300 steps on procedural data with a small random CLIP) trained and
  evaluated twice, float32 and bfloat16 (both towers), zero-shot top-1 on its held-out objects compared.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402
from cg3d_jax.models import point_ops  # noqa: E402
from cg3d_jax.models.point_transformer import PointTransformer  # noqa: E402

ARCHIVE = ROOT / 'tests' / 'fixtures' / 'modelnet40_normal_resampled.tar.xz'


def modelnet_clouds(stored: int = 8192) -> tuple[list[str], np.ndarray]:
  """Every object of the fixture archive: first `stored` points, centred and scaled to the unit sphere."""
  names, clouds = [], []
  with tarfile.open(ARCHIVE) as archive:
    for member in sorted(archive.getmembers(), key=lambda m: m.name):
      if not member.isfile() or not member.name.endswith('.txt') or '_' not in pathlib.Path(member.name).stem:
        continue
      if pathlib.Path(member.name).stem.startswith(('modelnet', 'filelist')):
        continue
      xyz = np.loadtxt(archive.extractfile(member), delimiter=',', dtype=np.float32)[:stored, :3]
      xyz = xyz - xyz.mean(0)
      names.append(pathlib.Path(member.name).stem)
      clouds.append(xyz / np.max(np.linalg.norm(xyz, axis=1)))
  return names, np.stack(clouds)


def feature_cosines() -> dict:
  names, clouds = modelnet_clouds()
  points = point_ops.sample_points(jnp.asarray(clouds), 1024)
  fp32 = PointTransformer(num_classes=55)
  variables = jax.jit(fp32.init, static_argnames='train')(jax.random.key(0), points[:2], train=False)
  feats = {}
  for name, dtype in (('float32', jnp.float32), ('bfloat16', jnp.bfloat16)):
    model = fp32.clone(dtype=dtype)
    out = jax.jit(model.apply, static_argnames='train')(variables, points, train=False)
    feats[name] = np.asarray(out, np.float64)
  a, b = feats['float32'], feats['bfloat16']
  cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  return {
    'objects': len(names),
    'min_cosine': float(cos.min()),
    'mean_cosine': float(cos.mean()),
    'per_object': dict(zip(names, map(float, cos))),
  }


def demo_top1(workdir: pathlib.Path) -> dict:
  out = {}
  for dtype in ('float32', 'bfloat16'):
    run = workdir / dtype
    args = [
      sys.executable,
      '-m',
      'cg3d_jax.demo',
      '--workdir',
      str(run),
      f'--override=model.dtype={dtype}',
      f'--override=clip.dtype={dtype}',
    ]
    subprocess.run(args, check=True, capture_output=True, text=True)
    results = json.loads((run / 'zeroshot' / 'results.json').read_text())
    out[dtype] = {k: results[k] for k in ('top1_acc', 'top5_acc', 'class_mean_acc', 'num_objects') if k in results}
  out['top1_gap_points'] = 100 * (out['float32']['top1_acc'] - out['bfloat16']['top1_acc'])
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--part', choices=['features', 'demo', 'both'], default='both')
  parser.add_argument('--workdir', default=None, help='where the two demo runs go (default: a temporary folder)')
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  print(load.report(), flush=True)
  result = {'machine': load.report(), 'jax': jax.__version__, 'backend': jax.default_backend()}
  if args.part in ('features', 'both'):
    result['features'] = feature_cosines()
    f = result['features']
    print(
      f'real-size PointTransformer, {f["objects"]} ModelNet40 objects: cosine(fp32, bf16) min '
      f'{f["min_cosine"]:.5f}, mean {f["mean_cosine"]:.5f}',
      flush=True,
    )
  if args.part in ('demo', 'both'):
    with tempfile.TemporaryDirectory() as tmp:
      result['demo'] = demo_top1(pathlib.Path(args.workdir or tmp))
    d = result['demo']
    print(
      f'demo zero-shot top-1: float32 {d["float32"]["top1_acc"]:.4f}, bfloat16 {d["bfloat16"]["top1_acc"]:.4f} '
      f'({d["top1_gap_points"]:+.1f} points)'
    )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
