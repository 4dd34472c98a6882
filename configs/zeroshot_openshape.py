"""Zero-shot on OpenShape's own ModelNet40 and ScanObjectNN evaluation files (meta_data/modelnet40/test_pc.npy,
test_split.json, cat_name_pt_feat.npy; meta_data/scanobjectnn/xyz_label.npy, cat_name_pt_feat.npy), scored with the
precomputed class-name features by default.

  python -m cg3d_jax.evaluate --config zeroshot_openshape:modelnet40 --checkpoint /runs/openshape_pb \
      --workdir /tmp/mn40 --config.eval.manual_dir=/data/openshape

arg: 'modelnet40' (default) or 'scanobjectnn'. The layout's conventions hold: y and z swapped, ModelNet40's rgb
stored 0-255 (constant ~0.4 after /255), ScanObjectNN resampled with replacement and grey (0.4) without rgb.
"""

from cg3d_jax.configs import base
from cg3d_jax.configs.zeroshot_objaverse_lvis import layout_eval


def get_config(arg=None):
  if arg in (None, '', 'modelnet40'):
    return layout_eval(base.get_base_config(), 'modelnet40_openshape')
  if arg == 'scanobjectnn':
    return layout_eval(base.get_base_config(), 'scanobjectnn_openshape')
  raise ValueError(f"zeroshot_openshape: arg must be 'modelnet40' or 'scanobjectnn', got {arg!r}")
