"""Write procedural rooms in the S3DIS layout: `python -m cg3d_jax.synthetic_scenes --root DIR`.

The rooms the demo queries and the scene tests read (cg3d_jax/synthetic/rooms.py says what they hold).
"""

from absl import flags

from cg3d_jax import cli
from cg3d_jax.errors import InputError
from cg3d_jax.synthetic import rooms

_DEFAULTS = rooms.SceneSettings()
ROOT = cli.root_flag()  # receives Stanford3dDataset_v1.2_Aligned_Version/
SEED = cli.seed_flag()
AREA = flags.DEFINE_integer('area', _DEFAULTS.area, 'Area number of the rooms.')
NUM_ROOMS = flags.DEFINE_integer('num_rooms', _DEFAULTS.num_rooms, 'Rooms to write.')
OBJECTS_PER_ROOM = flags.DEFINE_integer('objects_per_room', _DEFAULTS.objects_per_room, 'Distinct families per room.')
FLOOR_SIZE = flags.DEFINE_list('floor_size', [str(v) for v in _DEFAULTS.floor_size], 'Floor size X,Y in metres.')
POINTS_PER_M2 = flags.DEFINE_float('points_per_m2', _DEFAULTS.points_per_m2, 'Point density of floor and objects.')


# Flags defined once in cli (or scenes.flags) that this command takes: listed by its --help.
for _shared in ('root', 'seed', 'verbose'):
  flags.declare_key_flag(_shared)


def main(argv):
  del argv
  root = cli.require(ROOT, '--root /tmp/rooms')
  try:
    floor = tuple(float(v) for v in FLOOR_SIZE.value)
  except ValueError:
    floor = ()
  if len(floor) != 2:
    raise InputError(f'--floor_size {",".join(FLOOR_SIZE.value)!r}: expected two numbers X,Y in metres')
  settings = rooms.SceneSettings(
    seed=SEED.value,
    area=AREA.value,
    num_rooms=NUM_ROOMS.value,
    objects_per_room=OBJECTS_PER_ROOM.value,
    floor_size=floor,
    points_per_m2=POINTS_PER_M2.value,
  )
  area = rooms.ensure_synthetic_scenes(root, settings)
  for room, classes in rooms.scene_classes(root).items():
    print(f'{area / room}: {", ".join(classes)}')


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
