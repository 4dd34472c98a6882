"""Export a training checkpoint to PyTorch: `python -m cg3d_jax.export --checkpoint WORKDIR --out model.pth`."""

from absl import app, flags

from cg3d_jax import cli

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Training workdir or checkpoint step folder to export.')
OUT = flags.DEFINE_string('out', None, 'Output file (.pth for the original CG3D format, .safetensors otherwise).')
FORMAT = flags.DEFINE_enum('format', 'cg3d', ['cg3d', 'safetensors'], 'Container format of the export.')
VERIFY = flags.DEFINE_bool('verify', False, 'Reload the export into the PyTorch twins and compare features.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.not_built('export', 'export to PyTorch is issue 8 (export/import)')


if __name__ == '__main__':
  app.run(main)
