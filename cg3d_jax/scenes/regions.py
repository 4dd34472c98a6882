"""Splitting a scene into object-sized regions the point encoder can read, and spreading region scores to points.

The choice (see README, "Open scene queries"):
  * Centres: farthest-point sampling over the scene (on a voxel grid of side (1 - cover) x radius / sqrt(3), so a
    million-point room costs some thousands of candidates and no point is left outside every ball), continued until
    every candidate lies within `cover x radius` of a centre, or `max_regions` is reached. FPS spreads centres
    evenly over surfaces whatever the scan density, and the stopping rule adapts the count to the room's size: a
    small room gets few regions, a hall many.
  * Recentred copies: each centre also moves `recentre` mean-shift steps to the centroid of its ball's voxel
    representatives (the centroid of surface, whatever the scan density), which lands it on the middle of the
    object it grazed; these balls hold whole objects, as training clouds
    were. Centres closer than `merge x radius` are merged. The FPS balls stay, so coverage is kept.
  * Region: every scene point within `radius` (metres, in the scene's units) of its centre: a ball, not kNN, so a
    region is the same physical size in dense and sparse parts of a scan, as objects are.
  * Encoder input: `points_per_region` members drawn at random (all of them, cycled, when fewer; FPS in the model
    ignores repeats), centred on their mean, scaled to the unit sphere and turned so that the scene's up axis
    becomes the encoder's (S3DIS is z-up, ShapeNet objects are y-up), exactly as training normalised objects.
  * Support plane: with `exclude_floor`, points within `floor_band` of the scene's floor level (its 0.5th height
    percentile) take part in no region: a ball around a chair otherwise holds a disc of floor that no training
    object had. Those points score 0 and the summary counts them.
  * Per-point score: the weighted mean of the scores of the regions holding the point, weight
    exp(-d^2 / (2 (sigma x radius)^2)) for its distance d to the region's centre: regions centred on an object
    speak for its points more than regions that only graze it. `aggregate='max'` takes the best region instead.
    Points in no region score 0.
"""

import dataclasses

import numpy as np
from scipy import spatial

from cg3d_jax.errors import ConfigError

AXES = 'xyz'


@dataclasses.dataclass(frozen=True)
class RegionSettings:
  radius: float = 0.75  # metres for S3DIS: a chair, a table, a sofa's seat fit in a 1.5 m ball
  cover: float = 0.75  # every (voxelised) point ends within cover x radius of some centre
  max_regions: int = 1024
  min_points: int = 32  # fewer members than this: the region is dropped (too little to read as a shape)
  points_per_region: int | None = None  # None: the checkpoint's num_stored_points; its FPS takes num_points
  scene_up: str = 'z'
  model_up: str = 'y'
  exclude_floor: bool = False
  floor_band: float = 0.05
  sigma: float = 0.5
  aggregate: str = 'mean'  # 'mean' (distance-weighted) or 'max'
  recentre: int = 2  # mean-shift steps that move a copy of each ball onto the centroid of what it holds
  merge: float = 0.25  # centres closer than merge x radius are one region
  seed: int = 0

  def check(self) -> None:
    if not self.radius > 0:
      raise ConfigError(f'region radius (--radius) must be > 0 (scene units, metres for S3DIS), got {self.radius}')
    if not 0 < self.cover <= 1:
      raise ConfigError(f'region cover (--cover) must be in (0, 1], got {self.cover}')
    if self.max_regions < 1 or self.min_points < 1 or (self.points_per_region or 1) < 1:
      raise ConfigError(
        '--max_regions, --min_points and --points_per_region must be >= 1, got '
        f'{self.max_regions}, {self.min_points}, {self.points_per_region}'
      )
    for name in ('scene_up', 'model_up'):
      if getattr(self, name) not in AXES:
        raise ConfigError(f"--{name} must be one of 'x', 'y', 'z', got {getattr(self, name)!r}")
    if self.aggregate not in ('mean', 'max'):
      raise ConfigError(f"--aggregate must be 'mean' or 'max', got {self.aggregate!r}")
    if not self.sigma > 0:
      raise ConfigError(f'sigma must be > 0, got {self.sigma}')


@dataclasses.dataclass
class Regions:
  centres: np.ndarray  # (M, 3) scene coordinates
  member_region: np.ndarray  # (P,) int32: region of each (region, point) membership pair
  member_point: np.ndarray  # (P,) int32: scene point of each pair
  member_weight: np.ndarray  # (P,) float32: closeness weight of the point in that region
  sizes: np.ndarray  # (M,) points in each region
  encoder_points: np.ndarray  # (M, points_per_region, 3 | 6) float32, normalised, turned to the model's up axis
  num_scene_points: int
  excluded: np.ndarray  # (N,) bool: points kept out of every region (the floor band)

  def __len__(self) -> int:
    return self.centres.shape[0]

  def covered(self) -> np.ndarray:
    """(N,) bool: points that lie in at least one region."""
    out = np.zeros(self.num_scene_points, bool)
    out[self.member_point] = True
    return out


def up_rotation(scene_up: str, model_up: str) -> np.ndarray:
  """The proper rotation by 90 degrees (or identity) that takes the scene's up axis to the model's."""
  u, v = np.eye(3)[AXES.index(scene_up)], np.eye(3)[AXES.index(model_up)]
  if scene_up == model_up:
    return np.eye(3)
  a = np.cross(u, v)
  k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
  return np.eye(3) + k + k @ k  # Rodrigues at 90 degrees


def floor_mask(xyz: np.ndarray, settings: RegionSettings) -> np.ndarray:
  up = xyz[:, AXES.index(settings.scene_up)]
  return up <= np.percentile(up, 0.5) + settings.floor_band


def voxel_representatives(xyz: np.ndarray, voxel: float) -> np.ndarray:
  """Indices of the first point in each occupied voxel: a density-independent stand-in for the scene."""
  cells = np.floor((xyz - xyz.min(axis=0)) / voxel).astype(np.int64)
  extent = cells.max(axis=0) + 1
  keys = (cells[:, 0] * extent[1] + cells[:, 1]) * extent[2] + cells[:, 2]  # one int64 per cell: a 1-D unique
  _, first = np.unique(keys, return_index=True)
  return np.sort(first)


def farthest_centres(candidates: np.ndarray, stop_distance: float, max_centres: int) -> np.ndarray:
  """FPS over `candidates` from the lowest index, until all lie within stop_distance of a centre (indices)."""
  chosen = [0]
  min_dist = np.linalg.norm(candidates - candidates[0], axis=1)
  while len(chosen) < max_centres:
    far = int(np.argmax(min_dist))
    if min_dist[far] <= stop_distance:
      break
    chosen.append(far)
    np.minimum(min_dist, np.linalg.norm(candidates - candidates[far], axis=1), out=min_dist)
  return np.asarray(chosen)


def split_regions(xyz, settings: RegionSettings = RegionSettings(), colours=None) -> Regions:
  """Regions of a scene (N, 3); see the module docstring for every rule. `colours` (N, 3) in [0, 1], for a
  coloured encoder, ride along with each region's points (encoder_points then (M, S, 6))."""
  settings.check()
  if settings.points_per_region is None:
    raise ValueError('split_regions: points_per_region is None; scenes.query_scene fills it from the checkpoint')
  xyz = np.asarray(xyz, np.float64)
  if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
    raise ValueError(f'split_regions: expected a non-empty (N, 3) scene, got shape {xyz.shape}')
  if not np.all(np.isfinite(xyz)):
    raise ValueError('split_regions: the scene has NaN or Inf coordinates')
  if colours is not None and np.shape(colours) != xyz.shape:
    raise ValueError(f'split_regions: colours of shape {np.shape(colours)} for a scene of shape {xyz.shape}')
  excluded = floor_mask(xyz, settings) if settings.exclude_floor else np.zeros(xyz.shape[0], bool)
  usable = np.flatnonzero(~excluded)
  if usable.size < settings.min_points:
    raise ConfigError(
      f'split_regions: only {usable.size} points remain outside the floor band; a region needs '
      f'{settings.min_points} (lower --min_points, or keep the floor with --noexclude_floor; '
      'RegionSettings min_points / exclude_floor)'
    )
  points = xyz[usable]
  # Voxels this small keep every point within (1 - cover) x radius of a candidate, so within radius of a centre.
  candidates = voxel_representatives(points, (1 - settings.cover) * settings.radius / np.sqrt(3) + 1e-9)
  centre_idx = candidates[farthest_centres(points[candidates], settings.cover * settings.radius, settings.max_regions)]
  centres = points[centre_idx]
  if settings.recentre:
    # Object-centred balls look like training objects; the FPS balls stay too, so every point keeps a region.
    # Shifted over the voxel representatives: the centroid of surface area, whatever the scan density.
    shifted = _mean_shift(points[candidates], centres, settings.radius, settings.recentre)
    centres = _merge_close(np.concatenate([centres, shifted]), settings.merge * settings.radius)
  region, member, dist = _ball_members(spatial.cKDTree(points), centres, settings.radius)
  sizes = np.bincount(region, minlength=len(centres))
  keep = sizes >= settings.min_points
  if not keep.any():
    raise ConfigError(
      f'split_regions: no region of radius {settings.radius} holds {settings.min_points} points; '
      "is --radius in the scene's units (metres for S3DIS)?"
    )
  renumber = np.cumsum(keep) - 1
  in_kept = keep[region]
  region, member, dist = renumber[region[in_kept]].astype(np.int32), member[in_kept], dist[in_kept]
  centres, sizes = centres[keep], sizes[keep]
  weight = np.exp(-((dist / (settings.sigma * settings.radius)) ** 2) / 2).astype(np.float32)
  encoder_points = _encoder_inputs(
    points, region, member, sizes, settings, None if colours is None else np.asarray(colours, np.float32)[usable]
  )
  return Regions(
    centres=centres.astype(np.float32),
    member_region=region,
    member_point=usable[member].astype(np.int32),
    member_weight=weight,
    sizes=sizes,
    encoder_points=encoder_points,
    num_scene_points=xyz.shape[0],
    excluded=excluded,
  )


def _ball_members(tree: spatial.cKDTree, centres, radius):
  """(region, member, distance) of every point within radius of a centre, sorted by region, then point: one
  canonical order, so the points drawn for a region do not depend on the tree's traversal order."""
  # One vectorised call (C code). The 'ndarray' output keeps zero distances (a centre that is a scene point),
  # which the sparse outputs would drop.
  pairs = spatial.cKDTree(centres).sparse_distance_matrix(tree, radius, output_type='ndarray')
  order = np.lexsort((pairs['j'], pairs['i']))
  return pairs['i'][order].astype(np.int32), pairs['j'][order].astype(np.int32), pairs['v'][order]


def _mean_shift(points, centres, radius, iterations):
  tree = spatial.cKDTree(points)
  for _ in range(iterations):
    region, member, _ = _ball_members(tree, centres, radius)
    counts = np.bincount(region, minlength=len(centres))
    sums = np.stack([np.bincount(region, weights=points[member, a], minlength=len(centres)) for a in range(3)], 1)
    centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
  return centres


def _merge_close(centres, distance):
  """Drops every centre within `distance` of an earlier one (mean shift sends neighbours to one spot)."""
  if distance <= 0:
    return centres
  drop = {max(i, j) for i, j in spatial.cKDTree(centres).query_pairs(distance)}
  return centres[[i for i in range(len(centres)) if i not in drop]]


def _encoder_inputs(points, region, member, sizes, settings: RegionSettings, colours=None) -> np.ndarray:
  """(M, S, 3): S members per region (random without replacement, or all cycled), normalised, turned up; with
  `colours`, (M, S, 6): each member's colour beside its xyz."""
  rng = np.random.default_rng(settings.seed)
  starts = np.r_[0, np.cumsum(sizes)[:-1]]  # pairs are sorted by region
  count = settings.points_per_region
  out = np.empty((len(sizes), count, 3 if colours is None else 6), np.float32)
  rotation = up_rotation(settings.scene_up, settings.model_up)
  for m, (start, size) in enumerate(zip(starts, sizes)):
    pick = rng.choice(size, count, replace=False) if size > count else np.arange(count) % size
    cloud = points[member[start + pick]]
    distinct = cloud[: min(size, count)]  # a cycled region's first `size` rows are its members, each once
    cloud = cloud - distinct.mean(axis=0)
    cloud /= max(np.sqrt((cloud**2).sum(axis=1)).max(), 1e-12)
    out[m, :, :3] = cloud @ rotation.T
    if colours is not None:
      out[m, :, 3:] = colours[member[start + pick]]
  return out


def point_scores(regions: Regions, region_scores, aggregate: str = 'mean') -> np.ndarray:
  """(M, Q) region scores -> (N, Q) per-point scores (module docstring); points in no region score 0."""
  region_scores = np.asarray(region_scores, np.float64)
  if region_scores.ndim != 2 or region_scores.shape[0] != len(regions):
    raise ValueError(f'point_scores: expected ({len(regions)}, Q) region scores, got {region_scores.shape}')
  n, q = regions.num_scene_points, region_scores.shape[1]
  out = np.zeros((n, q))
  if aggregate not in ('mean', 'max'):
    raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
  if aggregate == 'mean':
    w = regions.member_weight.astype(np.float64)
    total = np.bincount(regions.member_point, weights=w, minlength=n)
  for j in range(q):  # one query at a time: a (pairs x queries) array would be GBs for a big room
    values = region_scores[regions.member_region, j]
    if aggregate == 'max':
      np.maximum.at(out[:, j], regions.member_point, values)  # probabilities are >= 0, so 0 is a safe floor
    else:
      out[:, j] = np.bincount(regions.member_point, weights=w * values, minlength=n)
  if aggregate == 'mean':
    np.divide(out, total[:, None], out=out, where=total[:, None] > 0)
  return out.astype(np.float32)
