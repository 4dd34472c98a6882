"""Point-cloud file readers on real fixture objects written in every format, mesh sampling, and bad files."""

import numpy as np
import pytest

from cg3d_jax.data.formats import mesh_sampling
from cg3d_jax.data.formats.ply_files import write_ply
from cg3d_jax.data.formats.point_files import BadInputError, read_points
from cg3d_jax.data.host_transforms import normalize_unit_sphere_np as normalize_points
from tests.conftest import modelnet_root


def _reference_normalize(xyz):
  centred = xyz.astype(np.float64) - xyz.astype(np.float64).mean(0)
  return centred / np.linalg.norm(centred, axis=1).max()


def _write_big_endian_ply(path, xyz, rgb):
  """A hand-written big-endian PLY in a different layout: colours first, double coordinates, an extra property,
  and an empty face element after the vertices."""
  header = (
    'ply\nformat binary_big_endian 1.0\ncomment by the test\nelement vertex {}\nproperty uchar red\n'
    'property uchar green\nproperty uchar blue\nproperty double x\nproperty double y\nproperty double z\n'
    'property float intensity\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n'
  )
  rows = np.empty(
    len(xyz), dtype=[('r', 'u1'), ('g', 'u1'), ('b', 'u1'), ('x', '>f8'), ('y', '>f8'), ('z', '>f8'), ('i', '>f4')]
  )
  rows['r'], rows['g'], rows['b'] = rgb.T
  rows['x'], rows['y'], rows['z'] = xyz.astype(np.float64).T
  rows['i'] = 0.5
  path.write_bytes(header.format(len(xyz)).encode() + rows.tobytes())


@pytest.fixture(scope='module')
def owl(fixtures_dir):
  path = fixtures_dir / 'openshape_owl' / 'owl.ply'
  table = np.loadtxt(path, skiprows=10)  # independent of the reader: 10 header lines, then x y z r g b
  return path, table[:, :3].astype(np.float32), table[:, 3:].astype(np.uint8)


@pytest.fixture(scope='module')
def airplane(fixtures_dir):
  path = modelnet_root() / 'airplane' / 'airplane_0627.txt'
  table = np.loadtxt(path, delimiter=',')
  return path, table[:, :3].astype(np.float32), table[:, 3:].astype(np.float32)


def test_owl_in_every_format_gives_identical_points_and_colours(owl, tmp_path):
  path, xyz, rgb = owl
  original = read_points(path)
  np.testing.assert_array_equal(original.xyz, xyz)
  np.testing.assert_array_equal(original.rgb, rgb)
  assert original.xyz.dtype == np.float32 and original.rgb.dtype == np.uint8 and original.xyz.shape == (10000, 3)

  write_ply(tmp_path / 'binary.ply', xyz, rgb)
  write_ply(tmp_path / 'ascii.ply', xyz, rgb, binary=False)
  _write_big_endian_ply(tmp_path / 'big_endian.ply', xyz, rgb)
  np.save(tmp_path / 'points.npy', np.concatenate([xyz, rgb.astype(np.float32)], axis=1))
  np.savetxt(
    tmp_path / 'space.txt', np.concatenate([xyz.astype(object), rgb.astype(object)], 1), fmt=['%.9g'] * 3 + ['%d'] * 3
  )
  np.savetxt(
    tmp_path / 'comma.txt',
    np.concatenate([xyz.astype(object), rgb.astype(object)], 1),
    fmt=['%.9g'] * 3 + ['%d'] * 3,
    delimiter=', ',
    header='x, y, z, r, g, b',
  )
  expected = normalize_points(xyz)
  np.testing.assert_allclose(expected, _reference_normalize(xyz), atol=1e-6)
  for name in ('binary.ply', 'ascii.ply', 'big_endian.ply', 'points.npy', 'space.txt', 'comma.txt'):
    cloud = read_points(tmp_path / name)
    np.testing.assert_array_equal(normalize_points(cloud.xyz), expected, err_msg=name)
    np.testing.assert_array_equal(cloud.rgb, rgb, err_msg=name)
    assert cloud.source == str(tmp_path / name) and not cloud.from_mesh


def test_modelnet_txt_in_every_format_gives_identical_points(airplane, tmp_path):
  path, xyz, normals = airplane
  original = read_points(path)
  np.testing.assert_array_equal(original.xyz, xyz)
  np.testing.assert_array_equal(original.normals, normals)  # 6 columns of unit vectors: normals, not colours
  assert original.rgb is None
  write_ply(tmp_path / 'binary.ply', xyz)
  write_ply(tmp_path / 'ascii.ply', xyz, binary=False)
  np.save(tmp_path / 'points.npy', np.concatenate([xyz, normals], axis=1))
  np.save(tmp_path / 'xyz64.npy', xyz.astype(np.float64))
  np.savetxt(tmp_path / 'space.txt', xyz, fmt='%.9g')
  expected = normalize_points(xyz)
  np.testing.assert_allclose(expected, _reference_normalize(xyz), atol=1e-6)
  for name in ('binary.ply', 'ascii.ply', 'points.npy', 'xyz64.npy', 'space.txt'):
    np.testing.assert_array_equal(normalize_points(read_points(tmp_path / name).xyz), expected, err_msg=name)


def _cube_off(path, header='OFF\n8 6 12\n', quads=True, colour=None):
  centre, half = np.array([1.0, -2.0, 0.5]), 0.75
  corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * half + centre
  vertex_lines = [
    ' '.join(f'{v:.6f}' for v in c) + ('' if colour is None else ' ' + ' '.join(map(str, colour))) for c in corners
  ]
  quads_list = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
  faces = (
    [f'4 {" ".join(map(str, q))}' for q in quads_list]
    if quads
    else [f'3 {q[0]} {q[i]} {q[i + 1]}' for q in quads_list for i in (1, 2)]
  )
  path.write_text(header + '\n'.join(vertex_lines + faces) + '\n')
  return centre, half


@pytest.mark.parametrize(
  'header,quads', [('OFF\n8 6 12\n', True), ('OFF8 12 18\n', False)], ids=['quads', 'modelnet_glued_header_triangles']
)
def test_off_cube_points_lie_on_the_surface_uniformly(tmp_path, header, quads):
  centre, half = _cube_off(tmp_path / 'cube.off', header, quads)
  cloud = read_points(tmp_path / 'cube.off', mesh_points=6000, seed=1)
  assert cloud.xyz.shape == (6000, 3) and cloud.xyz.dtype == np.float32 and cloud.from_mesh
  offset = np.abs(cloud.xyz - centre)
  np.testing.assert_allclose(offset.max(axis=1), half, atol=1e-5)  # on a face ...
  assert np.all(offset <= half + 1e-5)  # ... and inside the square
  # Equal-area faces get equal shares: each of the 6 faces holds 1000 ± a few standard deviations (≈29).
  face = np.argmax(offset, axis=1) * 2 + (
    cloud.xyz[np.arange(6000), np.argmax(offset, axis=1)] > centre[np.argmax(offset, axis=1)]
  )
  assert np.all(np.abs(np.bincount(face, minlength=6) - 1000) < 150)
  again = read_points(tmp_path / 'cube.off', mesh_points=6000, seed=1)
  other = read_points(tmp_path / 'cube.off', mesh_points=6000, seed=2)
  np.testing.assert_array_equal(again.xyz, cloud.xyz)
  assert not np.array_equal(other.xyz, cloud.xyz)


def test_coloured_off_and_ply_mesh(tmp_path):
  centre, half = _cube_off(tmp_path / 'cube.off', 'COFF\n8 6 0\n', colour=(200, 100, 50, 255))
  cloud = read_points(tmp_path / 'cube.off', mesh_points=500)
  assert np.all(cloud.rgb == [200, 100, 50])
  # The same cube as an ASCII PLY mesh with per-vertex colours varying along x: colours are interpolated.
  corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * half + centre
  red = np.where(corners[:, 0] > centre[0], 255, 0)
  quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
  lines = [
    'ply',
    'format ascii 1.0',
    'element vertex 8',
    'property float x',
    'property float y',
    'property float z',
    'property uchar red',
    'property uchar green',
    'property uchar blue',
    'element face 6',
    'property list uchar int vertex_indices',
    'end_header',
  ]
  lines += [f'{c[0]} {c[1]} {c[2]} {r} 0 0' for c, r in zip(corners, red)]
  lines += ['4 ' + ' '.join(map(str, q)) for q in quads]
  (tmp_path / 'cube.ply').write_text('\n'.join(lines) + '\n')
  mesh = read_points(tmp_path / 'cube.ply', mesh_points=2000)
  assert mesh.from_mesh and mesh.xyz.shape == (2000, 3)
  np.testing.assert_allclose(np.abs(mesh.xyz - centre).max(axis=1), half, atol=1e-5)
  expected_red = (mesh.xyz[:, 0] - (centre[0] - half)) / (2 * half) * 255
  np.testing.assert_allclose(mesh.rgb[:, 0], expected_red, atol=1.01)
  assert np.all(mesh.rgb[:, 1:] == 0)


@pytest.mark.parametrize('mixed', [False, True], ids=['quads', 'quads_and_triangles'])
def test_binary_ply_mesh(tmp_path, mixed):
  centre, half = np.array([0.0, 0.0, 2.0]), 1.5
  corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * half + centre
  quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
  faces = quads[:4] + [q[:3] for q in quads[4:]] + [(q[0], q[2], q[3]) for q in quads[4:]] if mixed else quads
  header = (
    f'ply\nformat binary_little_endian 1.0\nelement vertex 8\nproperty float x\nproperty float y\n'
    f'property float z\nelement face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n'
  )
  body = corners.astype('<f4').tobytes() + b''.join(
    np.uint8(len(f)).tobytes() + np.asarray(f, '<i4').tobytes() for f in faces
  )
  (tmp_path / 'cube.ply').write_bytes(header.encode() + body)
  cloud = read_points(tmp_path / 'cube.ply', mesh_points=3000, seed=5)
  assert cloud.from_mesh and cloud.rgb is None and cloud.xyz.shape == (3000, 3)
  offset = np.abs(cloud.xyz - centre)
  np.testing.assert_allclose(offset.max(axis=1), half, atol=1e-5)
  assert np.all(offset <= half + 1e-5)
  (tmp_path / 'cut.ply').write_bytes(header.encode() + body[:-3])
  _error(tmp_path / 'cut.ply', 'truncated')


def test_normalize_points_hand_case():
  np.testing.assert_allclose(normalize_points(np.array([[1.0, 1, 1], [3, 1, 1]])), [[-1, 0, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match='coincide'):
    normalize_points(np.ones((4, 3)))


def test_columns_argument_and_ambiguity(tmp_path):
  values = np.array([[0.1, 0.2, 0.3, 1.0, 0.5, 0.5, 9.0], [0.4, 0.5, 0.6, 0.0, 0.25, 1.0, 9.0]])
  np.savetxt(tmp_path / 'seven.txt', values, fmt='%.6g')
  with pytest.raises(BadInputError, match='seven.txt: 7 columns'):
    read_points(tmp_path / 'seven.txt')
  cloud = read_points(tmp_path / 'seven.txt', columns='xyz,rgb,skip')
  np.testing.assert_array_equal(cloud.rgb, [[255, 128, 128], [0, 64, 255]])
  ambiguous = np.array([[0.1, 0.2, 0.3, 0.6, 0.8, 0.0], [0.4, 0.5, 0.6, 0.0, 0.0, 1.0]])  # unit and in [0, 1]
  np.savetxt(tmp_path / 'six.txt', ambiguous, fmt='%.6g')
  with pytest.raises(BadInputError, match='--columns xyz,normals or --columns xyz,rgb'):
    read_points(tmp_path / 'six.txt')
  assert read_points(tmp_path / 'six.txt', columns='xyz,normals').normals is not None
  with pytest.raises(ValueError, match=r'columns \(--columns\) apply to .npy and text'):
    read_points(tmp_path / 'six.ply', columns='xyz')


def _error(path, match):
  with pytest.raises(BadInputError, match=match) as info:
    read_points(path)
  assert str(path) in str(info.value)


def test_bad_files_raise_clear_errors(owl, tmp_path):
  _, xyz, rgb = owl
  for name in ('empty.ply', 'empty.txt', 'empty.npy', 'empty.off'):
    (tmp_path / name).write_bytes(b'')
    _error(tmp_path / name, 'empty')
  (tmp_path / 'blank.txt').write_text('# only a comment\n\n')
  _error(tmp_path / 'blank.txt', 'no points')

  write_ply(tmp_path / 'whole.ply', xyz, rgb)
  data = (tmp_path / 'whole.ply').read_bytes()
  (tmp_path / 'cut.ply').write_bytes(data[:-100])
  _error(tmp_path / 'cut.ply', 'truncated')
  write_ply(tmp_path / 'whole_ascii.ply', xyz[:50], rgb[:50], binary=False)
  text = (tmp_path / 'whole_ascii.ply').read_text().splitlines()
  (tmp_path / 'cut_ascii.ply').write_text('\n'.join(text[:-3]) + '\n')
  _error(tmp_path / 'cut_ascii.ply', 'truncated: header promises 50 vertex lines')
  bad_row = text.copy()
  bad_row[20] = '0.1 0.2 0.3 1 2'  # file line 21
  (tmp_path / 'short_row.ply').write_text('\n'.join(bad_row) + '\n')
  _error(tmp_path / 'short_row.ply', 'line 21.*expected 6 numbers')
  (tmp_path / 'no_header.ply').write_text('0 0 0\n1 1 1\n')
  _error(tmp_path / 'no_header.ply', 'not a PLY file')

  rows = ['0.1,0.2,0.3', '0.4,0.5,0.6', 'nan,0.1,0.2', '0.3,0.4']
  (tmp_path / 'nan.txt').write_text('\n'.join(rows[:3]) + '\n')
  _error(tmp_path / 'nan.txt', 'line 3.*NaN')
  (tmp_path / 'ragged.txt').write_text('\n'.join(rows[:2] + rows[3:]) + '\n')
  _error(tmp_path / 'ragged.txt', 'line 3.*expected 3 numbers.*found 2')
  (tmp_path / 'word.txt').write_text('0.1 0.2 0.3\n0.1 zero 0.3\n')
  _error(tmp_path / 'word.txt', "line 2.*'zero' is not a number")
  (tmp_path / 'two_columns.txt').write_text('0.1 0.2\n0.3 0.4\n')
  _error(tmp_path / 'two_columns.txt', '2 columns per point')
  (tmp_path / 'binary.txt').write_bytes(b'\xff\xfe\x00garbage')
  _error(tmp_path / 'binary.txt', 'not a text file')

  np.save(tmp_path / 'nan.npy', np.array([[0, 0, 0], [np.nan, 0, 0]], np.float32))
  _error(tmp_path / 'nan.npy', 'NaN')
  np.save(tmp_path / 'flat.npy', np.zeros(30, np.float32))
  _error(tmp_path / 'flat.npy', r'expected an \(N, C\) array')
  np.save(tmp_path / 'whole.npy', xyz)
  (tmp_path / 'cut.npy').write_bytes((tmp_path / 'whole.npy').read_bytes()[:1000])
  _error(tmp_path / 'cut.npy', 'not a readable .npy')

  _cube_off(tmp_path / 'cube.off')
  off_lines = (tmp_path / 'cube.off').read_text().splitlines()
  (tmp_path / 'cut.off').write_text('\n'.join(off_lines[:-2]) + '\n')
  _error(tmp_path / 'cut.off', 'truncated: header promises 8 vertices and 6 faces')
  off_lines[-1] = '4 1 5 7 99'
  (tmp_path / 'bad_index.off').write_text('\n'.join(off_lines) + '\n')
  _error(tmp_path / 'bad_index.off', r'indices must lie in \[0, 8\)')
  (tmp_path / 'flat.off').write_text('OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n')
  _error(tmp_path / 'flat.off', 'no surface area')
  (tmp_path / 'not.off').write_text('MESH\n3 1 0\n')
  _error(tmp_path / 'not.off', "line 1.*expected an 'OFF'")

  (tmp_path / 'mesh.obj').write_text('v 0 0 0\n')
  with pytest.raises(BadInputError, match=r"mesh.obj: unknown point-cloud extension '.obj'; supported: .ply, .npy"):
    read_points(tmp_path / 'mesh.obj')
  with pytest.raises(FileNotFoundError, match='missing.ply'):
    read_points(tmp_path / 'missing.ply')


def test_write_ply_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match='NaN'):
    write_ply(tmp_path / 'x.ply', np.array([[np.nan, 0, 0]]))
  with pytest.raises(ValueError, match='0..255'):
    write_ply(tmp_path / 'x.ply', np.zeros((2, 3)), rgb=np.full((2, 3), 300))
  with pytest.raises(ValueError, match='shape'):
    write_ply(tmp_path / 'x.ply', np.zeros((2, 3)), rgb=np.zeros((3, 3), np.uint8))
  assert not list(tmp_path.iterdir())


def test_mesh_sampler_is_area_weighted():
  # Two triangles, areas 1 and 3: three quarters of the points land on the big one.
  vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [10, 0, 0], [13, 0, 0], [10, 2, 0]], np.float64)
  xyz, rgb = mesh_sampling.sample_mesh_surface(vertices, np.array([[0, 1, 2], [3, 4, 5]]), 8000, seed=0)
  assert rgb is None
  share_big = np.mean(xyz[:, 0] >= 10)
  assert abs(share_big - 0.75) < 0.02
  small = xyz[xyz[:, 0] < 10]
  assert np.all(small[:, 0] / 1 + small[:, 1] / 2 <= 1 + 1e-6) and np.all(small >= -1e-7)
