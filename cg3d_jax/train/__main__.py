"""CG3D pretraining: `python -m cg3d_jax.train --config demo --workdir /tmp/cg3d_demo`.

(The entry point lives in the train package as __main__.py, because `train/` and `train.py` cannot coexist.)
Running the same command again resumes from the newest checkpoint in the workdir.
"""

import json

from absl import app, flags, logging

from cg3d_jax import cli, distributed

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir
flags.adopt_module_key_flags(distributed)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.require_config()
  workdir = cli.require_workdir()
  distributed.initialize()
  from cg3d_jax.train import loop  # after distributed.initialize: importing the stack touches JAX backends

  result = loop.train(config, workdir)
  logging.info('final metrics: %s', json.dumps(result, sort_keys=True))


def run() -> None:
  """The console script's entry point."""
  cli.run(main)


if __name__ == '__main__':
  run()
