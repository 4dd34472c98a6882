"""Fine-tune a point encoder for classification:
`python -m cg3d_jax.finetune --config finetune_modelnet40 --workdir DIR [--init PATH]`.

--init: a CG3D pretraining workdir (or step folder), or an original CG3D .pth; without it (and without
config.finetune.init) the classifier starts from scratch. Running the same command again resumes from the newest
checkpoint in the workdir (the --init weights are only read on a fresh start). `python -m cg3d_jax.export
--checkpoint DIR --out model.pth` writes the result in Point-BERT's fine-tune format.
"""

import json

from absl import flags, logging

from cg3d_jax import cli, distributed
from cg3d_jax.errors import InputError

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir
flags.adopt_module_key_flags(distributed)

INIT = flags.DEFINE_string(
  'init',
  None,
  'Pretrained weights: a CG3D pretraining workdir/step folder or an '
  'original CG3D .pth (overrides config.finetune.init).',
)


def main(argv):
  del argv
  config = cli.require_config()
  if 'finetune' not in config:
    raise InputError(
      '--config is not a fine-tuning config (it has no `finetune` block); use --config '
      'finetune_modelnet40 or --config finetune_scanobjectnn:<variant>'
    )
  workdir = cli.require_workdir()
  distributed.initialize()
  from cg3d_jax.training import finetune  # after distributed.initialize: importing the stack touches JAX backends

  result = finetune.finetune(config, workdir, init=INIT.value)
  logging.info('final metrics: %s', json.dumps(result, sort_keys=True))


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
