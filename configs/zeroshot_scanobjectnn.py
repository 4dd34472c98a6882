"""Zero-shot classification on ScanObjectNN (15 classes, 2,048 points per object); always say which variant.

  python -m cg3d_jax.evaluate --config zeroshot_scanobjectnn:pb_t50_rs --checkpoint /runs/cg3d \
      --workdir /tmp/zs_sonn --config.eval.manual_dir=/data/ScanObjectNN/h5_files --config.eval.data_dir=/data/tfds

arg: the variant, obj_only | obj_bg | pb_t50_rs (the hardest, OpenShape's table), optionally ',ulip' for ULIP's
64-template ensemble, e.g. `--config zeroshot_scanobjectnn:obj_bg,ulip`.
"""

from cg3d_jax.configs import zeroshot_modelnet40

VARIANTS = ('obj_only', 'obj_bg', 'pb_t50_rs')


def get_config(arg=None):
  variant, _, templates = (arg or '').partition(',')
  if variant not in VARIANTS:
    raise ValueError(
      f'zeroshot_scanobjectnn needs the variant as arg, one of {VARIANTS} (optionally '
      f'",ulip"), e.g. zeroshot_scanobjectnn:pb_t50_rs; got {arg!r}'
    )
  return zeroshot_modelnet40.zeroshot_config(variant, 2048, templates)
