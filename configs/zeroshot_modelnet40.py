"""Zero-shot classification on ModelNet40 (test split, 2,468 objects), as CG3D reports it.

  python -m cg3d_jax.evaluate --config zeroshot_modelnet40 --checkpoint /runs/cg3d --workdir /tmp/zs40 \
      --config.eval.manual_dir=/data/modelnet40_normal_resampled --config.eval.data_dir=/data/tfds

arg: '' (default) = CG3D's one template "This is a {}" with raw class names ("flower_pot"), cosine scores;
'original' = the original eval.py's protocol exactly: the same template, text features left unnormalised (what the
paper's numbers were computed with); 'ulip' = ULIP's 64-template ensemble with names written as words ("flower pot").

The model (encoder, point count, CLIP, prompts) comes from the checkpoint's own config; this file only says what to
score it on. `clip.path` here, when set, replaces the CLIP folder recorded in the checkpoint.
"""

from ml_collections import config_dict

from cg3d_jax.configs import base


def zeroshot_config(dataset: str, num_stored_points: int, arg=None):
  """The shared eval block; `dataset` is a cg3d_jax.data.builders name."""
  c = base.get_base_config()
  c.eval.task = 'zeroshot'  # or 'retrieval' (ShapeNet-55 only; retrieval_shapenet55)
  c.eval.dataset = dataset
  c.eval.data_dir = config_dict.placeholder(str)  # where the prepared TFDS data lives (or is written)
  c.eval.manual_dir = config_dict.placeholder(str)  # the official raw layout, read when data_dir is not prepared
  c.eval.skip_bad = False  # skip listed objects that are missing or degenerate when preparing (never silently)
  c.eval.split = 'test'
  c.eval.max_examples = config_dict.placeholder(int)  # None: the whole split
  c.eval.batch_size = 64  # global; a multiple of the device count. The last batch is padded and masked.
  # Clouds keep their first num_stored_points points, are centred and scaled to the unit sphere, then FPS on device
  # picks the encoder's N points. 8192 is Point-BERT's ModelNet setting; 10000 uses every point of a ModelNet file.
  c.eval.num_stored_points = num_stored_points
  c.eval.y_up = config_dict.placeholder(bool)  # True: swap y and z (stored y-up; OpenShape sees z-up); None: as stored
  c.eval.use_color = False  # True: xyz + grey 0.4 (these sets store no colour) for a coloured encoder
  protocol_fields(c)
  # The prompts (eval.templates, name_style, normalize_text, ks) keep base.py's CG3D settings unless arg says.
  c.eval.step = config_dict.placeholder(int)  # checkpoint step to read; None: the newest
  if arg in (None, ''):
    pass
  elif arg == 'ulip':
    c.eval.templates, c.eval.name_style = 'ulip', 'words'
  elif arg == 'original':
    c.eval.normalize_text = False  # the original eval.py's validate_ZS, text features as the text tower gives them
  else:
    raise ValueError(
      f"zero-shot config arg must be '' (CG3D's template), 'original' (CG3D's template and "
      f"unnormalised text, as the original eval.py) or 'ulip' (64-template ensemble), got {arg!r}"
    )
  return c


def protocol_fields(c):
  """What every evaluate config says of a released family's file (evaluators/protocols.py)."""
  # 'published': a ULIP / OpenShape / Uni3D file is scored with its family's published protocol (prompts, axes,
  # colour), whatever the fields above say; 'config': with these fields as they are. CG3D's own checkpoints: the
  # fields above either way.
  c.eval.protocol = 'published'
  c.eval.num_points = config_dict.placeholder(int)  # points encoded; None: the checkpoint's (a family's published)


def get_config(arg=None):
  return zeroshot_config('modelnet40', 8192, arg)
