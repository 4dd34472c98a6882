"""Open scene queries: regions and scores against brute-force NumPy, metrics against their definitions, and the
whole feature end to end on procedural rooms with the test-sized demo model."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from cg3d_jax import evaluate_scenes, query_scene, trained
from cg3d_jax.data.formats import ply_files, point_files
from cg3d_jax.scenes import detection_metrics, outputs, queries, s3dis
from cg3d_jax.scenes import regions as scene_regions
from cg3d_jax.synthetic import rooms as synthetic_rooms
from cg3d_jax.synthetic import shapes
from tests.conftest import NEAR_TIE, grouping_margin, point_features, run_command

FAMILIES = list(shapes.FAMILIES)


# ---------------------------------------------------------------------------------------------------------------
# Metrics against their definitions, on fixed scores with ties.


def _ap_by_definition(scores, targets):
  """Mean over positives of the precision among everything scored at least as high."""
  return np.mean([np.sum(targets[scores >= s]) / np.sum(scores >= s) for s in scores[targets]])


def _auroc_by_pairs(scores, targets):
  pos, neg = scores[targets], scores[~targets]
  return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def test_average_precision_and_auroc_equal_their_definitions():
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(2, 40))
    scores = rng.integers(0, 6, size=n) / 5.0  # few distinct values: many ties
    targets = rng.uniform(size=n) < 0.4
    targets[trial % n] = True
    ap = detection_metrics.average_precision(scores, targets)
    assert ap == pytest.approx(_ap_by_definition(scores, targets), abs=1e-12)
    if not targets.all():
      assert detection_metrics.roc_auc(scores, targets) == pytest.approx(_auroc_by_pairs(scores, targets), abs=1e-12)


def test_metrics_hand_values_and_undefined_cases():
  scores = np.array([0.9, 0.8, 0.7, 0.6])
  targets = np.array([True, False, True, False])
  assert detection_metrics.average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)
  assert detection_metrics.roc_auc(scores, targets) == pytest.approx(3 / 4)
  assert np.isnan(detection_metrics.average_precision(scores, np.zeros(4, bool)))
  assert np.isnan(detection_metrics.roc_auc(scores, np.ones(4, bool)))
  assert detection_metrics.nan_mean([0.5, float('nan'), 1.0]) == (0.75, 2)
  with pytest.raises(ValueError, match='boolean'):
    detection_metrics.roc_auc(scores, np.array([1, 0, 1, 0]))


# ---------------------------------------------------------------------------------------------------------------
# Regions and per-point scores against brute force.


@pytest.fixture(scope='module')
def small_scene():
  rng = np.random.default_rng(1)
  floor = np.c_[rng.uniform(0, 3, (400, 2)), rng.normal(0, 0.002, 400)]
  blob = rng.normal([1.5, 1.5, 0.5], [0.15, 0.15, 0.1], (200, 3))
  blob[:, 2] = np.maximum(blob[:, 2], 0.2)  # an object standing clear of the floor band
  return np.concatenate([floor, blob])


@pytest.mark.parametrize('recentre', [0, 2])
def test_regions_hold_exactly_the_points_within_radius(small_scene, recentre):
  settings = scene_regions.RegionSettings(radius=0.5, points_per_region=64, min_points=1, recentre=recentre)
  regions = scene_regions.split_regions(small_scene, settings)
  dist = np.linalg.norm(small_scene[None] - regions.centres[:, None].astype(np.float64), axis=-1)
  inside = dist <= 0.5
  got = np.zeros_like(inside)
  got[regions.member_region, regions.member_point] = True
  assert np.array_equal(got, inside)
  assert np.array_equal(regions.sizes, inside.sum(axis=1))
  np.testing.assert_allclose(regions.member_weight, np.exp(-((dist[inside] / 0.25) ** 2) / 2), rtol=1e-5)
  assert regions.covered().all()  # the FPS stopping rule leaves no point outside every ball
  if recentre == 0:
    assert (dist.min(axis=0) <= 0.75 * 0.5 + 1e-6).all()


def test_encoder_inputs_are_normalised_members_turned_y_up(small_scene):
  settings = scene_regions.RegionSettings(radius=0.5, points_per_region=512, min_points=1, recentre=0)
  regions = scene_regions.split_regions(small_scene, settings)
  z_to_y = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # (x, y, z) -> (x, z, -y): scene up becomes model up
  for m in range(len(regions)):
    members = small_scene[regions.member_point[regions.member_region == m]]
    assert members.shape[0] <= 512  # so every member is used (cycled), none drawn away
    expected = members - members.mean(axis=0)
    expected = expected / np.linalg.norm(expected, axis=1).max() @ z_to_y.T
    got = np.unique(regions.encoder_points[m].astype(np.float64), axis=0)
    np.testing.assert_allclose(got, np.unique(expected.round(6), axis=0), atol=2e-6)


def test_point_scores_equal_brute_force(small_scene):
  settings = scene_regions.RegionSettings(radius=0.6, points_per_region=32, min_points=1)
  regions = scene_regions.split_regions(small_scene, settings)
  region_scores = np.random.default_rng(2).uniform(size=(len(regions), 2))
  dist = np.linalg.norm(small_scene[None] - regions.centres[:, None].astype(np.float64), axis=-1)
  inside = dist <= 0.6
  w = np.where(inside, np.exp(-((dist / 0.3) ** 2) / 2), 0.0)
  expected_mean = (w.T @ region_scores) / w.sum(axis=0)[:, None]
  expected_max = np.stack([np.where(inside, region_scores[:, [j]], 0).max(axis=0) for j in range(2)], axis=1)
  np.testing.assert_allclose(scene_regions.point_scores(regions, region_scores, 'mean'), expected_mean, rtol=1e-5)
  np.testing.assert_allclose(scene_regions.point_scores(regions, region_scores, 'max'), expected_max, rtol=1e-6)


def test_floor_band_is_kept_out_and_scores_zero(small_scene):
  settings = scene_regions.RegionSettings(radius=0.5, points_per_region=32, exclude_floor=True)
  regions = scene_regions.split_regions(small_scene, settings)
  assert regions.excluded[:400].mean() > 0.95 and not regions.excluded[400:].any()
  assert not np.isin(np.flatnonzero(regions.excluded), regions.member_point).any()
  scores = scene_regions.point_scores(regions, np.ones((len(regions), 1)))
  assert (scores[regions.excluded] == 0).all() and (scores[400:] == 1).all()


def test_region_settings_errors(small_scene):
  with pytest.raises(ValueError, match='radius'):
    scene_regions.split_regions(small_scene, scene_regions.RegionSettings(radius=0, points_per_region=8))
  with pytest.raises(ValueError, match='scene_up'):
    scene_regions.split_regions(small_scene, scene_regions.RegionSettings(scene_up='w', points_per_region=8))
  with pytest.raises(ValueError, match="scene's units"):
    scene_regions.split_regions(small_scene, scene_regions.RegionSettings(radius=1e-4, points_per_region=8))


def test_top_view_shows_the_highest_point_of_each_pixel():
  xyz = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
  image = outputs.top_view(xyz, rgb, size=4, splat=0)
  assert image.shape == (4, 4, 3)
  assert image[3, 0].tolist() == [0, 255, 0]  # (0, 0): the higher, green point; +y is up in the image
  assert image[0, 3].tolist() == [0, 0, 255]
  assert (image.reshape(-1, 3) == 255).all(axis=1).sum() == 14
  # One splat pass fills each empty pixel from its highest neighbour: green (height 1) beats red (0.5) beats blue (0).
  xyz = np.r_[xyz, [[0.5, 0.5, 0.5]]]
  rgb = np.r_[rgb, [[255, 0, 0]]].astype(np.uint8)
  g, b, r, w = [0, 255, 0], [0, 0, 255], [255, 0, 0], [255, 255, 255]
  expected = [[w, w, b, b], [w, r, r, r], [g, g, r, r], [g, g, r, r]]
  assert outputs.top_view(xyz, rgb, size=4, splat=1).tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# End to end on procedural rooms with the demo model.

QUERY_SETTINGS = queries.QuerySettings(regions=scene_regions.RegionSettings(radius=0.6, exclude_floor=True))


@pytest.fixture(scope='module')
def rooms(tmp_path_factory):
  root = tmp_path_factory.mktemp('scenes')
  settings = synthetic_rooms.SceneSettings(num_rooms=4)
  synthetic_rooms.ensure_synthetic_scenes(root, settings)
  class_names = tuple(FAMILIES) + ('floor',)
  rooms = s3dis.list_rooms(root, [settings.area])
  return root, [s3dis.read_room(d, class_names=class_names, unknown_class=None) for d in rooms]


@pytest.fixture(scope='module')
def demo_model(demo_run):
  return trained.with_clip(trained.load_trained(demo_run.workdir))


@pytest.fixture(scope='module')
def room_queries(rooms, demo_model):
  _, room_list = rooms
  settings = queries.resolve_settings(QUERY_SETTINGS, demo_model)
  classifier = queries.label_classifier(demo_model, FAMILIES, settings)
  return [
    queries.query_scene(demo_model, room.xyz, FAMILIES, [], settings=settings, classifier=classifier)
    for room in room_list
  ]


def test_reader_sees_the_rooms_the_writer_placed(rooms):
  root, room_list = rooms
  truth = synthetic_rooms.scene_classes(root)
  assert [r.name for r in room_list] == sorted(truth)
  for room in room_list:
    assert sorted(set(room.present_classes()) - {'floor'}) == truth[room.name]


def test_read_scene_takes_room_folders_room_files_and_point_files(rooms, tmp_path):
  room = rooms[1][0]
  np.save(tmp_path / 'scene.npy', room.xyz)
  ply_files.write_ply(tmp_path / 'scene.ply', room.xyz, room.rgb)
  for path, colours in [
    (room.path, room.rgb),
    (room.path / f'{room.name}.txt', room.rgb),
    (tmp_path / 'scene.ply', room.rgb),
    (tmp_path / 'scene.npy', None),
  ]:
    xyz, rgb = queries.read_scene(path)
    np.testing.assert_array_equal(xyz, room.xyz)  # the room file is the annotations concatenated, in order
    assert (rgb is None) if colours is None else np.array_equal(rgb, colours)
  with pytest.raises(ValueError, match='not an S3DIS room'):
    queries.read_scene(tmp_path)


def test_sharded_padded_region_batches_equal_one_unsharded_call(rooms, demo_model):
  import jax

  from cg3d_jax import sharding

  settings = scene_regions.RegionSettings(radius=0.6, points_per_region=256)
  model = demo_model.model
  encoder = model.encoder
  # Regions whose sampling and grouping hold no near-tie, so that programs compiled for other batch shapes (whose
  # float32 rounding may differ) pick the same points; 13: not a multiple of either batch size.
  stages = [(model.num_points, settings.points_per_region), (encoder.num_groups, encoder.group_size)]
  regions = [
    r
    for r in scene_regions.split_regions(rooms[1][0].xyz, settings).encoder_points
    if grouping_margin(r, stages) > NEAR_TIE
  ][:13]
  assert len(regions) == 13
  regions = np.stack(regions)
  direct = point_features(model, demo_model.encoder_vars, regions)
  eight = queries.RegionEmbedder(model, demo_model.encoder_vars, queries.local_mesh(), batch_size=8)(regions)
  one = queries.RegionEmbedder(
    model, demo_model.encoder_vars, sharding.make_mesh({'data': 1}, jax.devices()[:1]), batch_size=5
  )(regions)
  assert len(jax.local_devices()) == 8 and eight.shape == one.shape == direct.shape
  np.testing.assert_allclose(eight, direct, atol=2e-5)
  np.testing.assert_allclose(one, direct, atol=2e-5)


def test_present_class_points_outscore_the_rest(rooms, room_queries):
  _, room_list = rooms
  all_points, objects_only = [], []
  for room, result in zip(room_list, room_queries):
    names = np.array(room.class_names)[room.labels]
    not_floor = names != 'floor'
    for c in sorted(set(names) - {'floor'}):
      scores = result.point_scores[:, FAMILIES.index(c)]
      all_points.append(detection_metrics.roc_auc(scores, names == c))
      objects_only.append(detection_metrics.roc_auc(scores[not_floor], names[not_floor] == c))
  # Against every other point of the room (the floor is kept out of regions and scores 0) and, harder, against
  # the other objects only: a weakly trained 64-point encoder still ranks its class's points first.
  assert np.mean(all_points) > 0.8, all_points
  assert np.mean(objects_only) > 0.6, objects_only


def test_presence_summary_equals_numpy_from_region_similarities(room_queries):
  """Presence, recomputed in NumPy from the regions' cosine similarities: probabilities = softmax over labels of
  logit_scale x similarity; a query's margin in a region = its probability minus the best other label's; score =
  best margin over regions, present when above the threshold; regions won and the top regions by probability."""
  for result in room_queries:
    logits = result.logit_scale * result.region_similarity.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(result.region_probability, probs, rtol=1e-4, atol=1e-6)
    summary = result.presence()
    assert [e['query'] for e in summary] == list(FAMILIES)
    for q, entry in enumerate(summary):
      others = np.concatenate([probs[:, :q], probs[:, q + 1 :]], axis=1)
      margins = probs[:, q] - others.max(1)
      assert entry['score'] == pytest.approx(margins.max(), abs=1e-5)
      assert entry['present'] == (margins.max() > QUERY_SETTINGS.threshold)
      assert entry['regions_won'] == int((probs.argmax(1) == q).sum())
      top = [r['region'] for r in entry['top_regions']]
      assert len(top) == QUERY_SETTINGS.top_regions
      np.testing.assert_allclose(sorted(probs[top, q], reverse=True), np.sort(probs[:, q])[::-1][: len(top)], atol=1e-6)
      for r in entry['top_regions']:
        assert r['margin'] == pytest.approx(margins[r['region']], abs=1e-5)
  # Both answers occur over the 4 rooms, so the threshold comparison is exercised each way.
  answers = {e['present'] for result in room_queries for e in result.presence()}
  assert answers == {True, False}


def test_absent_classes_are_reported_absent_more_often_than_present(rooms, room_queries):
  _, room_list = rooms
  absent_says_present, absent_total = 0, 0
  for room, result in zip(room_list, room_queries):
    present = set(room.present_classes())
    for entry in result.presence():
      if entry['query'] not in present:
        absent_total += 1
        absent_says_present += entry['present']
  assert absent_total == 4 * (len(FAMILIES) - 3)
  assert absent_says_present < absent_total / 2, (absent_says_present, absent_total)


def test_query_scene_command_writes_every_output(rooms, demo_run, tmp_path, capsys):
  root, room_list = rooms
  room = room_list[0]
  out = tmp_path / 'out'
  code = run_command(
    query_scene.main,
    [
      '--checkpoint',
      str(demo_run.workdir),
      '--scene',
      str(room.path),
      '--queries',
      'box, mug',
      '--vocabulary',
      'training',
      '--radius',
      '0.6',
      '--exclude_floor',
      '--out',
      str(out),
    ],
  )
  assert code == 0, capsys.readouterr().err
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['queries'] == ['box', 'mug'] and summary['labels'][:2] == ['box', 'mug']
  assert sorted(summary['labels']) == sorted(FAMILIES)  # the training vocabulary, each label once
  xyz, rgb = s3dis.read_room_cloud(room.path)
  scores = np.load(out / 'point_scores.npy')
  assert scores.shape == (xyz.shape[0], 2) and scores.dtype == np.float32
  assert ((scores >= 0) & (scores <= 1)).all()
  for q, result in enumerate(summary['results']):
    assert result['present'] == (result['score'] > 0)
    cloud = point_files.read_points(out / result['files']['ply'])
    assert len(cloud) == xyz.shape[0]
    np.testing.assert_allclose(cloud.xyz, xyz, atol=1e-6)
    assert cloud.rgb.dtype == np.uint8 and cloud.rgb.min() >= 0 and cloud.rgb.max() <= 255
    assert np.array_equal(cloud.rgb, outputs.heat_colours(scores[:, q]))
    with Image.open(out / result['files']['png']) as image:
      assert image.mode == 'RGB' and max(image.size) > 512
  assert 'regions' in capsys.readouterr().out


def test_query_scene_command_errors(demo_run, tmp_path, capsys):
  args = ['--checkpoint', str(demo_run.workdir), '--queries', 'box', '--out', str(tmp_path / 'o')]
  assert run_command(query_scene.main, args + ['--scene', str(tmp_path / 'missing.ply')]) == 2
  assert 'does not exist' in capsys.readouterr().err
  assert run_command(query_scene.main, args[:2] + ['--queries', 'box,,mug', '--scene', str(tmp_path)]) == 2
  assert 'non-empty' in capsys.readouterr().err


def test_evaluate_scenes_json_matches_its_room_scores(rooms, demo_run, tmp_path):
  root, room_list = rooms
  out = tmp_path / 'eval'
  classes = ','.join(FAMILIES)
  code = run_command(
    evaluate_scenes.main,
    [
      '--checkpoint',
      str(demo_run.workdir),
      '--s3dis',
      str(root),
      '--areas',
      '5',
      '--class_names',
      ','.join(FAMILIES + ['floor']),
      '--classes',
      classes,
      '--vocabulary',
      'none',
      '--radius',
      '0.6',
      '--exclude_floor',
      '--out',
      str(out),
    ],
  )
  assert code == 0
  result = json.loads((out / evaluate_scenes.RESULTS_JSON).read_text())
  assert result['num_rooms'] == len(room_list)
  aps, aurocs = [], []
  for c in FAMILIES:
    scores = np.array([r['classes'][c]['score'] for r in result['rooms']])
    truth = np.array([r['classes'][c]['present'] for r in result['rooms']])
    assert truth.tolist() == [c in room.present_classes() for room in room_list]
    if truth.any():
      aps.append(_ap_by_definition(scores, truth))
      aurocs.append(np.mean([r['classes'][c]['auroc'] for r in result['rooms'] if r['classes'][c]['present']]))
    assert result['per_class'][c]['rooms_present'] == truth.sum()
  assert result['mAP'] == pytest.approx(np.mean(aps)) and result['classes_in_mAP'] == len(aps)
  assert result['mean_auroc'] == pytest.approx(np.mean(aurocs))


def test_region_colours_ride_with_their_points():
  """With colours (a coloured encoder's input), every region row carries its own point's colour: colours that encode
  each point's scene position, normalised as the region is, give back the row's xyz; the xyz rows are unchanged."""
  rng = np.random.default_rng(0)
  xyz = rng.uniform(0, 4, (3000, 3))
  colours = ((xyz - xyz.min(0)) / (xyz.max(0) - xyz.min(0))).astype(np.float32)
  settings = scene_regions.RegionSettings(radius=0.8, points_per_region=64, exclude_floor=False)
  plain = scene_regions.split_regions(xyz, settings)
  coloured = scene_regions.split_regions(xyz, settings, colours)
  assert coloured.encoder_points.shape == plain.encoder_points.shape[:2] + (6,)
  np.testing.assert_array_equal(coloured.encoder_points[..., :3], plain.encoder_points)
  rotation = scene_regions.up_rotation(settings.scene_up, settings.model_up)
  for m in range(len(coloured)):
    scene = coloured.encoder_points[m, :, 3:] * (xyz.max(0) - xyz.min(0)) + xyz.min(0)  # back to positions
    members = xyz[coloured.member_point[coloured.member_region == m]]
    assert np.abs(scene[:, None] - members[None]).max(axis=-1).min(axis=1).max() < 1e-5  # each row is a member
    distinct = scene[: min(coloured.sizes[m], 64)]  # a cycled region's first rows are its members once
    centred = scene - distinct.mean(axis=0)
    np.testing.assert_allclose(
      centred / np.linalg.norm(centred, axis=1).max() @ rotation.T, coloured.encoder_points[m, :, :3], atol=1e-4
    )
  with pytest.raises(ValueError, match=r'colours of shape \(5, 3\)'):
    scene_regions.split_regions(xyz, settings, colours[:5])
