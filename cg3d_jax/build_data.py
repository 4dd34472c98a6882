"""Prepare a dataset once from its official files: `python -m cg3d_jax.build_data --dataset NAME --manual_dir RAW
--data_dir TFDS`.

  python -m cg3d_jax.build_data --dataset shapenet55_cg3d --manual_dir /data/ShapeNet55 --data_dir /data/tfds
  python -m cg3d_jax.build_data --dataset modelnet40 --manual_dir /data/modelnet40_normal_resampled --data_dir ...
  python -m cg3d_jax.build_data --dataset pb_t50_rs --manual_dir /data/ScanObjectNN/h5_files --data_dir ...

The same TFDS builders and the same result as `tfds build cg3d_jax/data/<builder>.py --config ...`, without the
`tfds` command line's extra requirements (apache_beam, mlcroissant). Names: shapenet55_cg3d, modelnet40, modelnet10,
obj_only, obj_bg, pb_t50_rs (or builder/config). Run it once before a multi-process job, which does not prepare.
"""

from absl import flags, logging

from cg3d_jax import cli

DATASET = flags.DEFINE_string(
  'dataset',
  None,
  'Dataset to prepare: shapenet55_cg3d, modelnet40, modelnet10, obj_only, obj_bg or pb_t50_rs (or builder/config).',
)
MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Folder holding the official raw files.')
DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data folder to write the prepared dataset into.')
SKIP_BAD = cli.skip_bad_flag()


# Flags defined once in cli (or scenes.flags) that this command takes: listed by its --help.
for _shared in ('skip_bad', 'verbose'):
  flags.declare_key_flag(_shared)


def main(argv):
  del argv
  for flag, example in (
    (DATASET, 'modelnet40'),
    (MANUAL_DIR, '/data/modelnet40_normal_resampled'),
    (DATA_DIR, '/data/tfds'),
  ):
    cli.require(flag, f'--{flag.name} {example}')
  from cg3d_jax.data import builders  # TensorFlow loads slowly: after the flags are checked

  builder = builders.get_builder(
    DATASET.value,
    data_dir=DATA_DIR.value,
    manual_dir=MANUAL_DIR.value,
    skip_bad=SKIP_BAD.value,
    fields=builders.FLAG_FIELDS,
  )
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  logging.info('prepared %s', builder.info.full_name)
  print(f'{builder.info.full_name} in {builder.data_dir}: ' + ', '.join(f'{n} {c} examples' for n, c in splits.items()))


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
