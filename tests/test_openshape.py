"""OpenShape's layout (issue 20): the restricted pickled-dict reader, the split files, the per-sample target sampling
and augmentation against the rules of OpenShape_code @abe5aa4 src/data.py, on procedural objects written in that
layout (np.save of a dict, as OpenShape writes them)."""

import json
import os

import numpy as np
import pytest

from cg3d_jax.data import openshape
from cg3d_jax.data.pickled_npy import read_pickled_dict
from cg3d_jax.errors import BadInputError
from cg3d_jax.synthetic.openshape_objects import write_openshape_layout

CLASSES = ('sphere', 'box', 'torus')


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  return write_openshape_layout(tmp_path_factory.mktemp('openshape'), classes=CLASSES, train_per_class=4,
                                lvis_per_class=2, num_points=512, feature_dim=16)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_pickled_dicts_read_as_numpy_does_and_a_malicious_pickle_is_refused(layout, tmp_path):
  path = layout / 'data' / 'Objaverse' / 'sphere_000.npy'
  ours = read_pickled_dict(path)
  reference = np.load(path, allow_pickle=True).item()  # our own procedural file: safe to load the unsafe way here
  assert sorted(ours) == sorted(reference)
  for key in ('xyz', 'rgb', 'image_feat', 'thumbnail_feat'):
    np.testing.assert_array_equal(ours[key], reference[key])
    assert ours[key].dtype == np.float32
  np.testing.assert_array_equal(ours['text_feat'][0]['prompt_avg'], reference['text_feat'][0]['prompt_avg'])
  assert ours['text'] == reference['text'] and ours['blip_caption'] == reference['blip_caption']

  marker = tmp_path / 'pwned'
  evil = tmp_path / 'evil.npy'
  np.save(evil, {'xyz': np.zeros((4, 3)), 'payload': _Exploit(marker)}, allow_pickle=True)
  with pytest.raises(BadInputError, match=r'evil\.npy: refused: it names (posix|os)\.system'):
    read_pickled_dict(evil)
  assert not marker.exists()  # nothing in the file ran

  truncated = tmp_path / 'truncated.npy'
  truncated.write_bytes(path.read_bytes()[:300])
  with pytest.raises(BadInputError, match='truncated.npy: is not a readable pickled-dict'):
    read_pickled_dict(truncated)
  plain = tmp_path / 'plain.npy'
  np.save(plain, np.zeros((3, 3), np.float32))
  with pytest.raises(BadInputError, match='plain float32 array, expected a pickled dict'):
    read_pickled_dict(plain)


def test_split_files_and_shapes_read_exactly(layout):
  train = openshape.read_split(layout / 'meta_data' / 'split' / 'train_all.json')
  assert len(train) == 4 * len(CLASSES)
  assert {s.dataset for s in train} == {'Objaverse', 'ShapeNet'} and all(s.path.is_file() for s in train)
  lvis = openshape.read_split(layout / 'meta_data' / 'split' / 'lvis.json', lvis=True)
  assert sorted({s.category for s in lvis}) == sorted(CLASSES) and len(lvis) == 2 * len(CLASSES)
  table = np.load(layout / 'meta_data' / 'lvis_cat_name_pt_feat.npy')
  assert table.shape == (len(CLASSES), 16)
  data = openshape.read_shape(lvis[0].path, objaverse=True)
  assert data['xyz'].shape == data['rgb'].shape == (512, 3) and data['image_feat'].shape == (12, 16)
  flags = openshape.read_text_filter(layout / 'meta_data' / 'gpt4_filtering.json')
  assert set(flags.values()) == {'Y', 'N'}

  broken = layout / 'meta_data' / 'split' / 'broken.json'
  broken.write_text(json.dumps([{'id': 'x', 'dataset': 'Objaverse'}]))
  with pytest.raises(BadInputError, match=r"broken.json: entry 0 .* expected the keys \['id', 'dataset', 'group'"):
    openshape.read_split(broken)


def test_points_swap_y_and_z_and_augment_as_openshape(layout):
  path = layout / 'data' / 'ShapeNet' / 'sphere_001.npy'
  data = openshape.read_shape(path, objaverse=False)
  plain = openshape.SampleConfig(num_points=256, normalize=False, augment=False, random_z_rotate=False)
  points = openshape.sample_points(data, plain, np.random.default_rng(3), train=True, path=path)
  chosen = np.random.default_rng(3).choice(512, 256, replace=False)  # the same draw, by hand
  np.testing.assert_array_equal(points[:, :3], data['xyz'][chosen][:, [0, 2, 1]])  # y-up -> z-up
  np.testing.assert_array_equal(openshape.sample_points(data, openshape.SampleConfig(
      num_points=256, normalize=False, augment=False, random_z_rotate=False, y_up=False), np.random.default_rng(3),
      train=True)[:, :3], data['xyz'][chosen])  # Uni3D / ULIP-2 convention: stored axes
  # A rotation about z keeps z and every point's distance from the z axis.
  turned = openshape.sample_points(data, openshape.SampleConfig(num_points=256, augment=False, use_color=False),
                                   np.random.default_rng(4), train=True)
  unturned = openshape.sample_points(data, openshape.SampleConfig(num_points=256, augment=False, use_color=False,
                                                                   random_z_rotate=False),
                                     np.random.default_rng(4), train=True)
  np.testing.assert_allclose(turned[:, 2], unturned[:, 2], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(turned[:, :2], axis=1), np.linalg.norm(unturned[:, :2], axis=1),
                             atol=1e-5)
  assert not np.allclose(turned, unturned, atol=1e-3)
  # Colour replaced by 0.4 in about half the training samples, never in evaluation.
  rng = np.random.default_rng(5)
  config = openshape.SampleConfig(num_points=64)
  dropped = [np.all(openshape.sample_points(data, config, rng, train=True)[:, 3:] == 0.4) for _ in range(400)]
  assert 0.42 < np.mean(dropped) < 0.58
  assert not np.all(openshape.sample_points(data, config, rng, train=False)[:, 3:] == 0.4)
  # Point dropout moves up to 87.5% of the points onto the first one.
  rng = np.random.default_rng(6)
  xyz = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
  fractions = []
  for _ in range(300):
    out = openshape.augment_pc(xyz, rng)
    fractions.append(np.mean(np.all(np.isclose(out, out[0], atol=1e-6), axis=1)))
  assert max(fractions) <= 0.875 + 0.05 and 0.38 < np.mean(fractions) < 0.50  # uniform ratio in [0, 0.875]


def _draws(shape, data, config, flags, n=3000, seed=0):
  rng = np.random.default_rng(seed)
  return [openshape.make_example(shape, data, config, rng, flags=flags) for _ in range(n)]


def test_targets_are_sampled_by_openshape_rules(layout):
  train = openshape.read_split(layout / 'meta_data' / 'split' / 'train_all.json')
  flags = openshape.read_text_filter(layout / 'meta_data' / 'gpt4_filtering.json')
  config = openshape.SampleConfig(num_points=32)
  by_id = {s.id: s for s in train}

  # Objaverse, name kept, both captions present: text[0], one caption, one retrieval text; 1/3 each.
  shape = by_id['box_002']
  assert shape.dataset == 'Objaverse' and flags[shape.id] == 'Y'
  data = openshape.read_shape(shape.path, objaverse=True)
  draws = _draws(shape, data, config, flags)
  texts = [d['text'] for d in draws]
  assert np.mean([t == 'a box' for t in texts]) == pytest.approx(1 / 3, abs=0.03)
  assert np.mean([t in ('a 3d model of a box', 'a box shape') for t in texts]) == pytest.approx(1 / 3, abs=0.03)
  assert np.mean([t == 'a 3d model of a box' for t in texts]) == pytest.approx(1 / 6, abs=0.03)
  # Objaverse image target: the thumbnail half the time, else one of the 12 views.
  thumb = [np.array_equal(d['image_feat'], data['thumbnail_feat']) for d in draws]
  assert np.mean(thumb) == pytest.approx(0.5, abs=0.03)
  assert all(any(np.array_equal(d['image_feat'], v) for v in data['image_feat']) for d, t in zip(draws, thumb)
             if not t)
  # The text feature is the chosen text's own: the name's prompt_avg, a retrieval text's 'original'.
  for d in draws[:50]:
    if d['text'] == 'a box':
      np.testing.assert_array_equal(d['text_feat'], data['text_feat'][0]['prompt_avg'])
    elif d['text'] in data['retrieval_text']:
      i = data['retrieval_text'].index(d['text'])
      np.testing.assert_array_equal(d['text_feat'], data['retrieval_text_feat'][i]['original'])

  # GPT-4 flag "N": the Objaverse name is never a target; an empty MSFT caption gives no caption that time.
  shape = by_id['box_000']
  assert shape.dataset == 'Objaverse' and flags[shape.id] == 'N'
  data = openshape.read_shape(shape.path, objaverse=True)
  assert data['msft_caption'] == ''
  texts = [d['text'] for d in _draws(shape, data, config, flags)]
  assert 'a box' not in texts
  # Half the draws have the BLIP caption and the retrieval text (1/2 each), half only the retrieval text.
  assert np.mean([t == 'a 3d model of a box' for t in texts]) == pytest.approx(0.25, abs=0.03)

  # Other datasets: no thumbnail, a random view.
  shape = by_id['box_001']
  assert shape.dataset == 'ShapeNet'
  data = openshape.read_shape(shape.path, objaverse=False)
  draws = _draws(shape, data, config, flags, n=300)
  assert all(any(np.array_equal(d['image_feat'], v) for v in data['image_feat']) for d in draws)
  assert all(d['has_text'] for d in draws)
  # No text source at all: no text target, a zero feature and has_text False.
  none = openshape.make_example(shape, data, openshape.SampleConfig(num_points=32, text_source=()),
                                np.random.default_rng(0))
  assert not none['has_text'] and not np.any(none['text_feat'])
