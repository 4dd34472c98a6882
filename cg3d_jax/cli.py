"""Command-line conventions shared by the entry points (`python -m cg3d_jax.<command>`).

Every command takes `--config path/to/config.py[:arg]` (an ml_collections config file with `get_config(arg)`,
overridable as `--config.train.batch_size=32`) and `--workdir`, where it writes logs, metrics and outputs.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Experiment config: a Python file with get_config(arg), e.g. configs/demo.py or configs/demo.py:arg. '
    'Override any field with --config.<path>=<value>, e.g. --config.train.batch_size=32; unknown keys are errors.',
    lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics (JSONL + TensorBoard) and outputs.')


def require_config():
  """The parsed config, or a clear exit when --config is missing."""
  if CONFIG.value is None:
    sys.exit('error: --config is required, e.g. --config configs/demo.py')
  return CONFIG.value


def require_workdir() -> str:
  if not WORKDIR.value:
    sys.exit('error: --workdir is required: the directory for checkpoints, metrics and outputs')
  os.makedirs(WORKDIR.value, exist_ok=True)
  return WORKDIR.value


def not_built(command: str, issue: str) -> None:
  """Exit non-zero from a command whose implementation has not landed, rather than pretend to work."""
  logging.error('%s is not built yet (%s).', command, issue)
  sys.exit(f'error: `python -m cg3d_jax.{command}` is not implemented yet: {issue}')
