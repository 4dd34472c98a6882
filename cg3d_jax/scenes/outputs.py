"""What a scene query leaves on disk: JSON summary, per-point scores (NPY), heat-coloured PLY and a top view PNG.

  <out>/summary.json               scene, settings, per query: present?, score, top regions (queries.SceneQuery)
  <out>/point_scores.npy           (N, Q) float32, columns in the order of summary.json's "queries"
  <out>/<query>.ply                the scene, coloured by the query's per-point relevance (inferno: dark = 0,
                                   bright yellow = 1), binary PLY that any point-cloud viewer opens
  <out>/<query>_top.png            the scene seen from above: its own colours (left) and the heat map (right)

Colours use the absolute probability scale [0, 1], not a per-query stretch, so an absent query looks dark.
Every file is written atomically.
"""

import os
import pathlib
import re
from typing import Sequence

import numpy as np

from cg3d_jax.atomic import atomic_write_npy, atomic_write_png
from cg3d_jax.data.formats import ply_files
from cg3d_jax.evaluators import reports
from cg3d_jax.scenes import regions as scene_regions

BACKGROUND = np.array([255, 255, 255], np.uint8)


def heat_colours(scores) -> np.ndarray:
  """(N,) scores in [0, 1] -> (N, 3) uint8 through matplotlib's perceptually uniform 'inferno' map."""
  from matplotlib import colormaps

  scores = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
  return (colormaps['inferno'](scores)[:, :3] * 255).round().astype(np.uint8)


def file_stem(query: str) -> str:
  """'coffee table' -> 'coffee_table': a name that is safe on every file system."""
  stem = re.sub(r'[^A-Za-z0-9._-]+', '_', query.strip()).strip('._')
  return stem or 'query'


def unique_stems(queries: Sequence[str]) -> list[str]:
  stems, seen = [], {}
  for q in queries:
    stem = file_stem(q)
    seen[stem] = seen.get(stem, 0) + 1
    stems.append(stem if seen[stem] == 1 else f'{stem}_{seen[stem]}')
  return stems


def top_view(xyz, rgb, *, up: str = 'z', size: int = 512, splat: int | None = None) -> np.ndarray:
  """(H, W, 3) uint8 orthographic view down the up axis; each pixel shows its highest point.

  splat: passes that fill each empty pixel from its highest non-empty neighbour, so a sparse scan reads as
  surfaces rather than dots; None picks enough passes to close the typical gap between points.
  """
  xyz = np.asarray(xyz, np.float64)
  up_axis = scene_regions.AXES.index(up)
  u_axis, v_axis = [a for a in range(3) if a != up_axis]
  u, v, height = xyz[:, u_axis], xyz[:, v_axis], xyz[:, up_axis]
  span = max(np.ptp(u), np.ptp(v), 1e-9)
  width, rows = (max(1, int(round(size * np.ptp(u) / span))), max(1, int(round(size * np.ptp(v) / span))))
  col = np.minimum(((u - u.min()) / span * size).astype(np.int64), width - 1)
  row = np.minimum(((v.max() - v) / span * size).astype(np.int64), rows - 1)  # +v points up in the image
  pixel = row * width + col
  order = np.lexsort((height, pixel))  # by pixel, then height: the last of each pixel's run is its top point
  last = np.r_[pixel[order][1:] != pixel[order][:-1], True]
  top = order[last]
  image = np.tile(BACKGROUND, (rows * width, 1))
  image[pixel[top]] = np.asarray(rgb, np.uint8)[top]
  top_height = np.full(rows * width, -np.inf)
  top_height[pixel[top]] = height[top]
  if splat is None:
    splat = int(np.ceil(np.sqrt(rows * width / top.size) / 2))
  return _splat(image.reshape(rows, width, 3), top_height.reshape(rows, width), splat)


def _splat(image: np.ndarray, height: np.ndarray, passes: int) -> np.ndarray:
  for _ in range(passes):
    padded_h = np.pad(height, 1, constant_values=-np.inf)
    padded_c = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode='edge')
    best_h, best_c = height.copy(), image.copy()
    empty = np.isneginf(height)
    for dr, dc in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]:
      h = padded_h[1 + dr : 1 + dr + height.shape[0], 1 + dc : 1 + dc + height.shape[1]]
      c = padded_c[1 + dr : 1 + dr + height.shape[0], 1 + dc : 1 + dc + height.shape[1]]
      take = empty & (h > best_h)
      best_h = np.where(take, h, best_h)
      best_c = np.where(take[..., None], c, best_c)
    image, height = best_c, best_h
  return image


def write_query_outputs(out_dir, xyz, rgb, query_result, *, scene: str, up: str = 'z', image_size: int = 512) -> dict:
  """Writes every file above for a queries.SceneQuery; returns the summary (with file names) it wrote."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  xyz = np.asarray(xyz, np.float32)
  grey = np.full(xyz.shape, 160, np.uint8)
  own_colours = grey if rgb is None else np.asarray(rgb, np.uint8)
  own_view = top_view(xyz, own_colours, up=up, size=image_size)
  summary = {'scene': os.fspath(scene), **query_result.summary(), 'point_scores': 'point_scores.npy'}
  atomic_write_npy(out / 'point_scores.npy', query_result.point_scores.astype(np.float32))
  gap = np.tile(BACKGROUND, (own_view.shape[0], 8, 1))
  for q, stem in enumerate(unique_stems(query_result.queries)):
    colours = heat_colours(query_result.point_scores[:, q])
    ply_files.write_ply(out / f'{stem}.ply', xyz, colours)
    heat_view = top_view(xyz, colours, up=up, size=image_size)
    atomic_write_png(out / f'{stem}_top.png', np.concatenate([own_view, gap, heat_view], axis=1))
    summary['results'][q]['files'] = {'ply': f'{stem}.ply', 'png': f'{stem}_top.png'}
  reports.write_json(out / 'summary.json', summary)
  return summary
