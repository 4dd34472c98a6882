"""CG3D's point encoder trained on OpenShape's data (Objaverse + ShapeNet + 3D-FUTURE + ABO, xyz + rgb) against the
CLIP features OpenShape stores (OpenCLIP ViT-bigG-14, 1280-d): no CLIP tower runs in the step.

  python -m cg3d_jax.train --config pretrain_openshape --workdir gs://bucket/run \
      --config.data.manual_dir=/data/openshape

The data decides the recipe (config.data.name = 'openshape': training/recipes/stored_features.py). Per sample,
OpenShape's rules (cg3d_jax/data/openshape.py): 10,000 points, y/z swap, unit sphere, dropout/scale/shift/jitter,
full z rotation, rgb dropped to 0.4 with p 0.5; one text target drawn among name / caption / retrieval text, one
image target among thumbnail / views. Loss: point<->text (samples with a text) + point<->image InfoNCE over the
global batch, learned temperature initialised at 1/0.07 (OpenShape's logit_scale_init 14.28). Encoder: ULIP-2's
coloured Point-BERT size (12 x 384, 512 groups of 32, 6 input channels) projecting to 1280. Validation: zero-shot
Objaverse-LVIS with the precomputed class-name features.

Differences from OpenShape's train.yaml, on purpose: a per-step cosine schedule (OpenShape: x0.95 every 10k steps
after 10k warm-up steps), global batch 256 (OpenShape: 200 per GPU, all-gathered), gradient clipping at 10.
arg 'no_lvis' trains on train_no_lvis.json (the split OpenShape reports LVIS zero-shot with); 'shapenet' on the
ShapeNet-only ablation split; 'renders' uses OpenShape's raw renders through CG3D's prompt-tuned image tower instead
of the stored image features (then --config.clip.path is required: see data.openshape.renders); combine with commas,
e.g. --config pretrain_openshape:no_lvis,renders.
"""

from ml_collections import config_dict

from cg3d_jax.configs import base
from cg3d_jax.configs.zeroshot_objaverse_lvis import layout_eval


def openshape_data(c):
  """config.data for OpenShape's layout (cg3d_jax/data/openshape_stream.py reads it)."""
  c.data.name = 'openshape'
  c.data.train_split = 'train_all'  # train_all | train_no_lvis | train_shapenet_only, or a split file under manual_dir
  c.data.num_stored_points = 10000  # drawn without replacement from each stored cloud
  c.data.augment = True
  c.data.openshape = dict(
    y_up=True,  # OpenShape's files are y-up and fed z-up; False feeds the stored axes (Uni3D / ULIP-2)
    random_z_rotate=True,
    use_color=True,
    rgb_random_drop_prob=0.5,
    text_source=('text', 'caption', 'retrieval_text'),
    use_text_filtering=True,
    use_prompt_engineering=True,
    gpt4_filtering='meta_data/gpt4_filtering.json',
    workers=0,  # reader threads per process; 0 = min(16, CPUs)
    # None: image targets are the stored image features (no CLIP tower). A folder (under manual_dir, or absolute)
    # of OpenShape's raw renders (rendered_images/<uid>/colors_0..11.png): CG3D's method instead, a random render
    # through the frozen, prompt-tuned image tower of config.clip.path, which must be the CLIP the stored text
    # features came from (OpenShape's: OpenCLIP ViT-bigG-14 laion2b_s39b_b160k, as a transformers folder).
    renders=config_dict.placeholder(str),
  )
  return c


def get_config(arg=None):
  c = openshape_data(base.get_base_config())
  for part in (arg or '').split(','):
    if part == 'no_lvis':
      c.data.train_split = 'train_no_lvis'
    elif part == 'shapenet':
      c.data.train_split = 'train_shapenet_only'
    elif part == 'renders':
      c.data.openshape.renders = 'rendered_images'
    elif part:
      raise ValueError(
        f"pretrain_openshape: arg must be '', 'no_lvis', 'shapenet', 'renders' or a comma-separated "
        f'combination, got {arg!r}'
      )
  c.model.encoder = 'point_transformer'
  c.model.in_channels = 6
  c.model.embed_dim = 1280
  c.model.num_points = 10000
  c.model.point_transformer.update(dict(num_groups=512, group_size=32))
  c.train.batch_size = 256
  c.train.epochs = 200
  c.train.lambda_text = 1.0
  c.train.lambda_image = 1.0
  c.train.logit_scale_init = 14.28  # OpenShape's 1 / 0.07, learned (its LogitScaleNetwork)
  c.train.encoder_optim.update(dict(lr=1e-3, end_lr=1e-5, weight_decay=0.05, schedule='cosine', warmup_epochs=1))
  eval_every = c.eval.every_steps
  c = layout_eval(c, 'objaverse_lvis')
  c.eval.every_steps = eval_every
  c.eval.max_examples = None  # the whole LVIS set
  return c
