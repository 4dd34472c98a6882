"""Zero-shot prediction on your own point cloud (and, optionally, photos of candidates).

  python -m cg3d_jax.predict --checkpoint /runs/cg3d --points owl.ply --labels "owl,chicken,penguin" \
      [--images a.jpg b.jpg c.jpg] [--templates ulip] [--json out.json]

Points: PLY (ASCII or binary; meshes are sampled on their surface), NPY, OFF (surface-sampled) or TXT/XYZ/CSV
(see cg3d_jax/eval/point_files.py). The cloud is centred and scaled to the unit sphere as in training, then
farthest-point sampling on device picks the encoder's N points (clouds with fewer than N points are cycled,
which FPS ignores). Labels are ranked by cosine similarity to their text features (templates x label, as in
zero-shot evaluation) with probabilities softmax(CLIP's logit scale x similarity). Images, when given, are
preprocessed as the CLIP folder's preprocessor_config.json says, go through the prompt-tuned image tower, and are
ranked against the cloud the same way.
"""

import argparse
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.eval import metrics, point_files, reports, zeroshot
from cg3d_jax.models.cg3d import CG3D, sample_points


def parse_labels(text: str) -> list[str]:
  """'owl, chicken,penguin' -> ['owl', 'chicken', 'penguin']; empty or repeated labels are errors."""
  labels = [label.strip() for label in text.split(',')]
  if not text.strip() or any(not label for label in labels):
    raise ValueError(f'--labels {text!r}: expected comma-separated non-empty labels, e.g. "owl,chicken,penguin"')
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  if repeated:
    raise ValueError(f'--labels {text!r}: {repeated} appear more than once')
  return labels


def prepare_points(xyz, num_points: int) -> np.ndarray:
  """Training's normalisation (centre, unit sphere); clouds shorter than num_points are cycled up to it."""
  xyz = point_files.normalize_points(xyz)
  if xyz.shape[0] < num_points:
    xyz = xyz[np.arange(num_points) % xyz.shape[0]]
  return xyz


def read_image(path, preprocess) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      return preprocess(image)
  except FileNotFoundError:
    raise FileNotFoundError(f'image {path} does not exist') from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f'image {path}: cannot be read as an image ({e})') from None


def _ranked(names: Sequence[str], similarities: np.ndarray, scale: float) -> list[dict]:
  logits = scale * similarities.astype(np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-similarities, kind='stable')
  return [{'rank': r + 1, 'name': names[i], 'probability': float(probs[i]), 'similarity': float(similarities[i])}
          for r, i in enumerate(order)]


def predict(model: zeroshot.EvalModel, points_path, labels: Sequence[str], images: Sequence[str] = (), *,
            templates='cg3d_zeroshot', normalize_text: bool = True) -> dict:
  """{'points', 'num_points_read', 'labels': ranked [{rank, name, probability, similarity}], 'images': ranked}."""
  cloud = point_files.read_points(points_path)
  points = prepare_points(cloud.xyz, model.model.num_points)
  encode = jax.jit(lambda v, p: model.model.point_features(v, sample_points(p, model.model.num_points))[0])
  feature = np.asarray(encode(model.encoder_vars, jnp.asarray(points)[None]))[0]
  classifier = zeroshot.text_classifier(model.clip.model, model.clip_params, model.clip.tokenizer, labels, templates,
                                        normalize=normalize_text)
  scale = float(CG3D.logit_scale(model.clip_params))
  result = {'points': os.fspath(points_path), 'num_points_read': int(cloud.xyz.shape[0]),
            'from_mesh': cloud.from_mesh, 'num_points_encoded': model.model.num_points, 'logit_scale': scale,
            'labels': _ranked(list(labels), np.asarray(metrics.zero_shot_scores(feature[None], classifier))[0], scale)}
  if images:
    pixels = np.stack([read_image(path, model.clip.preprocess) for path in images])
    image_features = np.asarray(jax.jit(model.model.image_features)(model.clip_params, pixels))
    result['images'] = _ranked([os.fspath(p) for p in images], image_features @ feature, scale)
  return result


def format_result(result: dict) -> str:
  lines = [f"{result['points']}: {result['num_points_read']} points"
           f"{' sampled on the mesh' if result['from_mesh'] else ''}, normalised, "
           f"{result['num_points_encoded']} by farthest-point sampling",
           reports.format_table(result['labels'], ['rank', 'name', 'probability', 'similarity'], '{:.4f}')]
  if 'images' in result:
    lines += ['', 'images ranked against the cloud:',
              reports.format_table(result['images'], ['rank', 'name', 'probability', 'similarity'], '{:.4f}')]
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cg3d_jax.predict', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='training workdir or checkpoint step folder, or an original CG3D / exported .pth')
  parser.add_argument('--points', required=True, help='point-cloud file: .ply .npy .off .txt .xyz .csv')
  parser.add_argument('--labels', required=True, help='comma-separated candidate labels, e.g. "owl,chicken,penguin"')
  parser.add_argument('--images', nargs='+', default=[], help='image files to rank against the cloud')
  parser.add_argument('--templates', default='cg3d_zeroshot',
                      help="template set name ('cg3d_zeroshot', 'ulip', ...) or one template with {}")
  parser.add_argument('--no_normalize_text', action='store_true',
                      help="original CG3D quirk: don't L2-normalise text features")
  parser.add_argument('--clip_path', default=None, help='CLIP folder, if not the one recorded in the checkpoint')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--num_points', type=int, default=1024,
                      help='encoder input size, only for a .pth that does not record its config')
  parser.add_argument('--json', default=None, help='also write the result as JSON here')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  templates = [args.templates] if '{}' in args.templates else args.templates
  try:
    labels = parse_labels(args.labels)
    for path in [args.points, *args.images]:
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist or is not a file')
    model = zeroshot.load_eval_model(args.checkpoint, clip_path=args.clip_path, step=args.step,
                                     num_points=args.num_points)
    result = predict(model, args.points, labels, args.images, templates=templates,
                     normalize_text=not args.no_normalize_text)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:  # PointFileError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_result(result))
  if args.json:
    reports.write_json(args.json, result)
  return 0


if __name__ == '__main__':
  sys.exit(main())
