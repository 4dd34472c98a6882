"""Command-line conventions shared by the entry points (`python -m cg3d_jax.<command>` and the `cg3d-*` scripts).

Every command with an experiment config takes `--config NAME[:arg]` (a config the package ships, e.g. `demo` or
`pretrain_pointbert:8192`) or `--config path/to/config.py[:arg]` (an ml_collections config file with
`get_config(arg)`), overridable as `--config.train.batch_size=32`, and `--workdir`, where it writes logs, metrics
and outputs. Shipped names resolve to the installed package's own files, so commands work from any folder.
"""

import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / 'configs'

CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Experiment config: the name of a shipped config (e.g. demo, pretrain_pointbert:8192; see cg3d_jax/configs/) '
    'or a Python file with get_config(arg), e.g. my_config.py:arg. Override any field with --config.<path>=<value>, '
    'e.g. --config.train.batch_size=32; unknown keys are errors.',
    lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics (JSONL + TensorBoard) and outputs.')


def shipped_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob('*.py') if not p.stem.startswith('_'))


def resolve_config(value: str) -> str:
  """'demo' / 'pretrain_pointbert:8192' -> the shipped file (arg kept); an existing file path is kept as it is."""
  name, sep, arg = value.partition(':')
  if os.path.isfile(name):
    return value
  shipped = CONFIG_DIR / f'{name}.py'
  if os.sep not in name and '/' not in name and not name.endswith('.py') and shipped.is_file():
    return f'{shipped}{sep}{arg}'
  raise app.UsageError(f'--config {value!r}: no such file, and {name!r} is not a shipped config; shipped: '
                       f'{", ".join(shipped_configs())}')


def _with_resolved_config(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
    elif arg.startswith('--config='):
      out[i] = '--config=' + resolve_config(arg[len('--config='):])
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (with --help and usage errors), after turning a shipped config name into its file."""
  try:
    argv = _with_resolved_config(argv)
  except app.UsageError as err:
    sys.exit(f'error: {err}')
  return app.parse_flags_with_usage(argv)


def run(main) -> None:
  """app.run(main) with --config names resolved: what every absl command's `if __name__ == '__main__'` and console
  script call."""
  app.run(main, flags_parser=parse_flags)


def require_config():
  """The parsed config, or a clear exit when --config is missing."""
  if CONFIG.value is None:
    sys.exit('error: --config is required, e.g. --config demo (or a config file path)')
  return CONFIG.value


def require_workdir() -> str:
  if not WORKDIR.value:
    sys.exit('error: --workdir is required: the directory for checkpoints, metrics and outputs')
  os.makedirs(WORKDIR.value, exist_ok=True)
  return WORKDIR.value
