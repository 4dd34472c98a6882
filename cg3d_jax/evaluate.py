"""Zero-shot evaluation of a checkpoint: `python -m cg3d_jax.evaluate --config configs/zeroshot_<set>.py --checkpoint PATH`."""

from absl import app, flags

from cg3d_jax import cli

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Training workdir, checkpoint step folder or original CG3D .pth.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.not_built('evaluate', 'zero-shot evaluation is issue 7 (evaluation)')


if __name__ == '__main__':
  app.run(main)
