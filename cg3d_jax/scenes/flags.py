"""The command-line flags of the two scene commands (query_scene, evaluate_scenes), defined once here: how a scene
is split into regions and how regions are scored (defaults from scenes/regions.py and scenes/queries.py)."""

from absl import flags

from cg3d_jax import cli
from cg3d_jax.scenes import queries
from cg3d_jax.scenes import regions as scene_regions

_REGIONS = scene_regions.RegionSettings()
_QUERY = queries.QuerySettings()

RADIUS = flags.DEFINE_float('radius', _REGIONS.radius, 'Region (ball) radius in scene units (metres for S3DIS).')
COVER = flags.DEFINE_float(
  'cover', _REGIONS.cover, 'FPS adds centres until every point is within cover x radius of one.'
)
MAX_REGIONS = flags.DEFINE_integer('max_regions', _REGIONS.max_regions, 'At most this many region centres.')
MIN_POINTS = flags.DEFINE_integer('min_points', _REGIONS.min_points, 'Regions with fewer points are dropped.')
POINTS_PER_REGION = flags.DEFINE_integer(
  'points_per_region',
  _REGIONS.points_per_region,
  "Points drawn per region (default: the checkpoint's data.num_stored_points); "
  'the encoder takes its own num_points from them by FPS.',
)
SCENE_UP = flags.DEFINE_enum('scene_up', _REGIONS.scene_up, list('xyz'), "The scene's up axis (S3DIS: z).")
MODEL_UP = flags.DEFINE_enum(
  'model_up', _REGIONS.model_up, list('xyz'), "The up axis of the encoder's training objects (ShapeNet: y)."
)
EXCLUDE_FLOOR = flags.DEFINE_bool(
  'exclude_floor', _REGIONS.exclude_floor, 'Keep the floor band out of every region (for object queries).'
)
FLOOR_BAND = flags.DEFINE_float('floor_band', _REGIONS.floor_band, 'Floor band height above the floor level.')
AGGREGATE = flags.DEFINE_enum(
  'aggregate',
  _REGIONS.aggregate,
  ['mean', 'max'],
  'Per-point score: distance-weighted mean or max over the regions holding the point.',
)
SEED = cli.seed_flag()
THRESHOLD = flags.DEFINE_float(
  'threshold',
  _QUERY.threshold,
  'Presence: best region margin (query probability minus the best other label) above this.',
)
TOP_REGIONS = flags.DEFINE_integer('top_regions', _QUERY.top_regions, 'Top regions listed per query.')
BATCH_SIZE = cli.batch_size_flag()  # its default is QuerySettings' (64)
TEMPLATES = cli.templates_flag()


def query_settings() -> queries.QuerySettings:
  """The settings the flags describe, checked."""
  templates = (TEMPLATES.value,) if TEMPLATES.value and '{}' in TEMPLATES.value else TEMPLATES.value
  regions = scene_regions.RegionSettings(
    radius=RADIUS.value,
    cover=COVER.value,
    max_regions=MAX_REGIONS.value,
    min_points=MIN_POINTS.value,
    points_per_region=POINTS_PER_REGION.value,
    scene_up=SCENE_UP.value,
    model_up=MODEL_UP.value,
    exclude_floor=EXCLUDE_FLOOR.value,
    floor_band=FLOOR_BAND.value,
    aggregate=AGGREGATE.value,
    seed=SEED.value,
  )
  regions.check()
  return queries.QuerySettings(
    regions=regions,
    threshold=THRESHOLD.value,
    top_regions=TOP_REGIONS.value,
    batch_size=BATCH_SIZE.value,
    templates=templates,
  )
