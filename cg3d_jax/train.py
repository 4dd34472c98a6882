"""CG3D pretraining: `python -m cg3d_jax.train --config pretrain_pointbert --workdir /runs/pb`.

Running the same command again resumes from the newest checkpoint in the workdir. The demo's data and CLIP are
written by `python -m cg3d_jax.demo_assets` first (the demo command runs both).
"""

import json

from absl import flags, logging

from cg3d_jax import cli, distributed

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir
flags.adopt_module_key_flags(distributed)


def main(argv):
  del argv
  config = cli.require_config()
  workdir = cli.require_workdir()
  distributed.initialize()
  from cg3d_jax.training import pretrain  # after distributed.initialize: importing the stack touches JAX backends

  result = pretrain.train(config, workdir)
  logging.info('final metrics: %s', json.dumps(result, sort_keys=True))


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
