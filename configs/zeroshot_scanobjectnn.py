"""Zero-shot classification on ScanObjectNN (15 classes, 2,048 points per object); always say which variant.

  python -m cg3d_jax.evaluate --config configs/zeroshot_scanobjectnn.py:pb_t50_rs --checkpoint /runs/cg3d \
      --workdir /tmp/zs_sonn --config.eval.manual_dir=/data/ScanObjectNN/h5_files --config.eval.data_dir=/data/tfds

arg: the variant, obj_only | obj_bg | pb_t50_rs (the hardest, OpenShape's table), optionally ',ulip' for ULIP's
64-template ensemble, e.g. `configs/zeroshot_scanobjectnn.py:obj_bg,ulip`.
"""

from configs import zeroshot_modelnet40

VARIANTS = ('obj_only', 'obj_bg', 'pb_t50_rs')


def get_config(arg=None):
  variant, _, templates = (arg or '').partition(',')
  if variant not in VARIANTS:
    raise ValueError(f'configs/zeroshot_scanobjectnn.py needs the variant as arg, one of {VARIANTS} (optionally '
                     f'",ulip"), e.g. configs/zeroshot_scanobjectnn.py:pb_t50_rs; got {arg!r}')
  return zeroshot_modelnet40.zeroshot_config(variant, 2048, templates)
