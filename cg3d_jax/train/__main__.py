"""CG3D pretraining: `python -m cg3d_jax.train --config configs/demo.py --workdir /tmp/cg3d_demo`.

(The entry point lives in the train package as __main__.py, because `train/` and `train.py` cannot coexist.)
"""

from absl import app, flags

from cg3d_jax import cli

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.require_config()
  workdir = cli.require_workdir()
  del config, workdir
  cli.not_built('train', 'the training loop is issue 6 (pretraining)')


if __name__ == '__main__':
  app.run(main)
