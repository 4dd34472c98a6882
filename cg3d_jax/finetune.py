"""Fine-tune a point encoder for classification:
`python -m cg3d_jax.finetune --config finetune_modelnet40 --workdir DIR [--init PATH]`.

--init: a CG3D pretraining workdir (or step folder), or an original CG3D .pth; without it (and without
config.finetune.init) the classifier starts from scratch. Running the same command again resumes from the newest
checkpoint in the workdir (the --init weights are only read on a fresh start).
"""

import json

from absl import app, flags, logging

from cg3d_jax import cli, distributed

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir
flags.adopt_module_key_flags(distributed)

INIT = flags.DEFINE_string('init', None, 'Pretrained weights: a CG3D pretraining workdir/step folder or an '
                           'original CG3D .pth (overrides config.finetune.init).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.require_config()
  if 'finetune' not in config:
    raise app.UsageError('--config is not a fine-tuning config (it has no `finetune` block); use '
                         '--config finetune_modelnet40 or --config finetune_scanobjectnn:<variant>')
  workdir = cli.require_workdir()
  distributed.initialize()
  from cg3d_jax.train import finetune  # after distributed.initialize: importing the stack touches JAX backends

  result = finetune.finetune(config, workdir, init=INIT.value)
  logging.info('final metrics: %s', json.dumps(result, sort_keys=True))


def run() -> None:
  """The console script's entry point."""
  cli.run(main)


if __name__ == '__main__':
  run()
