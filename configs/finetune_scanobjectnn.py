"""Fine-tuning a CG3D point encoder on ScanObjectNN: arg = variant (`obj_only`, `obj_bg`, `pb_t50_rs`, default
pb_t50_rs, the hardest), optionally with `,pointmlp`.

  python -m cg3d_jax.finetune --config finetune_scanobjectnn:obj_bg --workdir /runs/ft_objbg \
      --init /runs/cg3d_pretrain --config.data.manual_dir=/data/h5_files --config.data.data_dir=/data/tfds

The recipe is finetune_modelnet40's (same optimizer, schedule, batch 32, 1024 points: FPS to 1200 then a
random 1024, scale and translate) on the 2,048-point ScanObjectNN clouds, 15 classes.
"""

from cg3d_jax.configs import finetune_modelnet40


def get_config(arg=None):
  dataset, encoder = finetune_modelnet40.parse_arg(arg, 'pb_t50_rs')
  if dataset.startswith('modelnet'):
    raise ValueError(f'finetune_scanobjectnn: arg {arg!r} names a ModelNet dataset; use finetune_modelnet40')
  return finetune_modelnet40.get_finetune_config(dataset, encoder)
