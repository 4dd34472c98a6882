"""The pieces every experiment has. Experiment files start from `get_base_config()` and change what differs.

Every key that a command-line override may touch must exist here: ml_collections rejects unknown keys, which is
what turns a typo such as `--config.train.batch_szie=32` into an error instead of a silent no-op.
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The trainable 3D encoder. Sizes default to CG3D's released PointTransformer.
  c.model = ml_collections.ConfigDict()
  c.model.encoder = 'point_transformer'  # or 'pointmlp', 'ppat' (OpenShape's), 'uni3d' (Uni3D's)
  c.model.num_points = 1024  # points per cloud fed to the encoder (FPS from the stored 8192)
  # Input channels of either encoder: 3 (xyz) or 6 (xyz + rgb: ULIP-2's coloured Point-BERT, OpenShape's coloured
  # PointMLP). The TFDS datasets are xyz only; OpenShape's layout (pretrain_openshape) carries colours.
  c.model.in_channels = 3
  c.model.embed_dim = 512  # CLIP joint-space width the projection maps into
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32
  # Rematerialisation of the encoder's blocks: 'none', 'full' (keep each block's input only) or 'dots' (keep matmul
  # outputs); see models/layers.REMAT_POLICIES. Booleans of older configs mean 'none' / 'full'.
  c.model.remat = 'none'
  # The blocks run as one scanned layer (compiles once per stack); False unrolls the loop in the compiled program.
  # Parameters are the same either way.
  c.model.scan_layers = True
  # Attention kernel: 'auto' (cuDNN flash attention on GPUs in bf16/fp16, XLA elsewhere), 'xla', 'cudnn', 'einsum'.
  c.model.attention = 'auto'
  c.model.num_classes = 55  # classification head kept for strict PyTorch exports and fine-tuning
  # The encoder pretraining starts from (a training run, a CG3D .pth / .safetensors, a released ULIP / ULIP-2,
  # OpenShape or Uni3D file): its architecture and projection replace the sizes here; unset: fresh weights of these
  # sizes.
  c.model.init = config_dict.placeholder(str)
  c.model.point_transformer = ml_collections.ConfigDict(
    dict(
      width=384,
      depth=12,
      num_heads=6,
      mlp_ratio=4.0,
      num_groups=64,
      group_size=32,
      encoder_dim=256,
      drop_path_rate=0.1,
      head_hidden=256,
      head_dropout=0.5,
      projection_bias=True,  # False: ULIP / ULIP-2's bias-free pc_projection (their released encoders)
    )
  )
  c.model.pointmlp = ml_collections.ConfigDict(
    dict(
      embed_dim=64,
      res_expansion=1.0,
      dim_expansion=(2, 2, 2, 2),
      pre_blocks=(2, 2, 2, 2),
      pos_blocks=(2, 2, 2, 2),
      k_neighbors=(24, 24, 24, 24),
      reducers=(2, 2, 2, 2),
    )
  )
  # OpenShape's PPAT (models/ppat.py) at its released scaling 4; config.model.init from an OpenShape file sets these.
  c.model.ppat = ml_collections.ConfigDict(
    dict(
      width=512,
      depth=12,
      num_heads=8,
      head_dim=64,
      mlp_dim=1536,
      sa_channels=(64, 64, 256),
      num_patches=384,
      radius=0.2,
      num_samples=64,
    )
  )
  # Uni3D's EVA point transformer (models/uni3d.py) at its tiny size; config.model.init from a Uni3D file sets these.
  c.model.uni3d = ml_collections.ConfigDict(
    dict(
      width=192,
      depth=12,
      num_heads=3,
      mlp='glu',  # models/uni3d.MLP_KINDS: 'glu' (tiny, small), 'swiglu' (base, large), 'gelu' (giant)
      mlp_hidden=512,
      qkv_fused=True,
      num_groups=512,
      group_size=64,
      encoder_dim=512,
      drop_path_rate=0.0,
    )
  )

  # The frozen CLIP: a local transformers CLIP folder, or a SLIP checkpoint file (slip_base_100ep.pt, the paper's
  # backbone); image preprocessing and tokenisation follow the kind. Only the prompts train.
  c.clip = ml_collections.ConfigDict()
  c.clip.path = config_dict.placeholder(str)
  c.clip.dtype = 'float32'
  c.clip.remat = 'none'  # as model.remat
  c.clip.attention = 'auto'  # as model.attention
  c.clip.scan_layers = True  # as model.scan_layers
  c.clip.prompt = ml_collections.ConfigDict(dict(mode='deep', num_tokens=5))

  # Data: TFDS builders read the official layouts from manual_dir and write prepared data under data_dir.
  c.data = ml_collections.ConfigDict()
  c.data.name = 'shapenet55_cg3d'
  c.data.manual_dir = config_dict.placeholder(str)
  c.data.data_dir = config_dict.placeholder(str)
  c.data.train_split = 'train'
  c.data.num_views = 5  # renders stored per object; one is drawn per sample
  c.data.num_stored_points = 8192  # clouds are resampled to this before augmentation
  c.data.augment = True
  c.data.augment_prob = 0.3
  c.data.templates = 'cg3d'  # caption templates drawn at pre-training time
  c.data.shuffle_buffer = 2048
  c.data.prefetch = 2
  c.data.skip_bad = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64  # global, over all hosts
  c.train.epochs = 100
  c.train.total_steps = config_dict.placeholder(int)  # overrides epochs when set
  c.train.mode = 'joint'  # 'joint' or 'alternating' (the original's even/odd schedule)
  # Which epoch's learning rate a batch trains at: 'per_epoch', epoch e at lr(e) (the cosine the paper describes);
  # 'original', the original runner's scheduler calls (optim's docstring: with an odd number of batches per epoch
  # the encoder trains epoch e at lr(e - 1), with an even number at lr(0) throughout; one epoch more than epochs).
  c.train.lr_schedule = 'per_epoch'
  c.train.same_class_mask = False  # the original keeps same-class captions as negatives
  c.train.log_every = 50
  c.train.max_bad_steps = 5  # consecutive non-finite steps before the run stops
  c.train.encoder_optim = ml_collections.ConfigDict(
    dict(
      name='adamw',
      lr=5e-5,
      end_lr=1e-6,
      weight_decay=0.05,
      schedule='cosine_per_epoch',
      warmup_epochs=0,
      b1=0.9,
      b2=0.999,
      clip_norm=10.0,
    )
  )
  c.train.prompt_optim = ml_collections.ConfigDict(
    dict(name='sgd', lr=2e-3, momentum=0.9, weight_decay=1e-4, schedule='constant', clip_norm=10.0)
  )

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000
  c.eval.split = 'test'
  c.eval.max_examples = 3000  # the original validates on the first 3,000 ShapeNet-55 test shapes
  c.eval.batch_size = 64
  c.eval.templates = 'cg3d_zeroshot'  # a set of cg3d_jax.clip.templates ('cg3d_zeroshot', 'ulip', 'cg3d', ...)
  # How the class weights are made (evaluators/zeroshot.py): 'templates' (eval.templates over the class names through
  # the CLIP text tower), 'names' (the bare names), 'precomputed' (a layout's stored class-name features) or 'file'
  # (eval.class_features: a text tower the package cannot run, e.g. Uni3D's EVA02-E-14-plus).
  c.eval.prompts = 'templates'
  # With prompts='file': a .npz with `names` (C,) and `features` (C, D), rows matched to the split's classes by name,
  # or a .npy (C, D) whose rows are in the split's class order.
  c.eval.class_features = config_dict.placeholder(str)
  c.eval.name_style = 'raw'  # 'raw' (as stored, CG3D) or 'words' (ULIP's spellings, underscores to spaces)
  # False reproduces the original CG3D evaluation, whose text features were never L2-normalised: classes with
  # longer text features then score higher. Keep True (cosine similarity) except to reproduce published numbers.
  c.eval.normalize_text = True
  c.eval.ks = (1, 3, 5)  # top-k accuracies reported

  # Device mesh: -1 takes the devices left over. Batches shard over data x fsdp; big frozen matrices over fsdp.
  # min_fsdp_size: arrays with fewer elements stay replicated (the all-gather would cost more than it saves).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_fsdp_size=2**18))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, keep_best=True, async_save=True))

  # profile_steps=(start, stop): a JAX trace of those steps into <workdir>/profile (TensorBoard's profile plugin).
  c.logging = ml_collections.ConfigDict(dict(tensorboard=True, jsonl=True, profile_steps=()))

  # The offline demo's assets (python -m cg3d_jax.demo_assets writes them; training only reads data/clip paths): a
  # procedural ShapeNet-55-layout dataset and a small random CLIP, of these sizes: a transformers folder, or with
  # clip_kind='slip' a SLIP checkpoint file (its head counts follow from the widths: width / 64).
  c.demo = ml_collections.ConfigDict()
  c.demo.clip_kind = 'transformers'
  c.demo.vocab_path = config_dict.placeholder(str)  # the CLIP BPE file; default: the package's own copy
  c.demo.synthetic = ml_collections.ConfigDict(
    dict(num_train_per_class=24, num_test_per_class=6, num_points=1024, image_size=64, num_views=5, seed=0)
  )
  c.demo.clip = ml_collections.ConfigDict(
    dict(
      vision_width=64,
      vision_layers=2,
      vision_heads=4,
      patch_size=16,
      image_size=64,
      text_width=64,
      text_layers=2,
      text_heads=4,
      projection_dim=64,
      seed=0,
    )
  )
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  return get_base_config()
