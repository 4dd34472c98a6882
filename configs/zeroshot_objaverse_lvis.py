"""Zero-shot Objaverse-LVIS (1,156 classes, 46,205 shapes) in OpenShape's or Uni3D's layout; also the builder of the
eval block every layout set shares (OpenShape's ModelNet40 and ScanObjectNN configs, the pretrain_openshape
validation).

  python -m cg3d_jax.evaluate --config zeroshot_objaverse_lvis --checkpoint /runs/openshape_pb --workdir /tmp/lvis \
      --config.eval.manual_dir=/data/openshape

arg: '' (default) = OpenShape's layout and its precomputed class-name features (lvis.json,
lvis_cat_name_pt_feat.npy; y and z swapped as OpenShape feeds them); 'uni3d' = Uni3D's lvis_testset.txt over the same
files, the stored axes as Uni3D feeds them, the 64 templates through the CLIP of --config.clip.path (Uni3D has no
precomputed features); 'names' = OpenShape's layout with the bare class names through that CLIP.
Top-1/3/5 are per sample, the class mean beside them (OpenShape's and Uni3D's reporting).
"""

from ml_collections import config_dict

from cg3d_jax.configs import base, zeroshot_modelnet40


def layout_eval(c, dataset: str):
  """The config.eval block of a set in OpenShape's (or Uni3D's) layout (cg3d_jax/data/sources/openshape_layout.py)."""
  c.eval.task = 'zeroshot'
  c.eval.dataset = dataset  # objaverse_lvis | modelnet40_openshape | scanobjectnn_openshape
  c.eval.layout = 'openshape'  # objaverse_lvis only: 'openshape' (lvis.json) or 'uni3d' (lvis_testset.txt)
  c.eval.manual_dir = config_dict.placeholder(str)  # OpenShape: the folder with meta_data/; Uni3D: objaverse_lvis/
  c.eval.list_file = config_dict.placeholder(str)  # Uni3D's lvis_testset.txt (default: <manual_dir>/lvis_testset.txt)
  c.eval.prompts = 'precomputed'  # 'precomputed' (the layout's features), 'names' or 'templates' (through a CLIP)
  c.eval.templates = 'ulip'  # with prompts='templates': the 64 modelnet40_64 templates of ULIP-2 / Uni3D
  c.eval.y_up = config_dict.placeholder(bool)  # None: the layout's convention (OpenShape swaps y/z, Uni3D does not)
  c.eval.use_color = True  # xyz + rgb (the encoder's in_channels must be 6); False: xyz only
  c.eval.num_stored_points = 10000  # points drawn per cloud (OpenShape's 10,000); FPS on device to model.num_points
  zeroshot_modelnet40.protocol_fields(c)
  c.eval.split = 'test'
  c.eval.max_examples = config_dict.placeholder(int)
  c.eval.batch_size = 64
  c.eval.step = config_dict.placeholder(int)
  return c


def get_config(arg=None):
  c = layout_eval(base.get_base_config(), 'objaverse_lvis')
  if arg == 'uni3d':
    c.eval.layout, c.eval.prompts = 'uni3d', 'templates'
  elif arg == 'names':
    c.eval.prompts = 'names'
  elif arg not in (None, ''):
    raise ValueError(
      f"zeroshot_objaverse_lvis: arg must be '' (OpenShape's layout, precomputed features), 'uni3d' "
      f"or 'names', got {arg!r}"
    )
  return c
