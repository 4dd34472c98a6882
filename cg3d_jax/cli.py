"""Command-line conventions shared by the entry points (`python -m cg3d_jax.<command>` and the `cg3d-*` scripts).

Every command with an experiment config takes `--config NAME[:arg]` (a config the package ships, e.g. `demo` or
`pretrain_pointbert:8192`) or `--config path/to/config.py[:arg]` (an ml_collections config file with
`get_config(arg)`), overridable as `--config.train.batch_size=32`, and `--workdir`, where it writes logs, metrics
and outputs. Shipped names resolve to the installed package's own files, so commands work from any folder.
"""

import difflib
import functools
import importlib.resources
import importlib.util
import os
import pathlib
import re
import sys
import traceback
import types
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from cg3d_jax.errors import InputError

# The shipped experiment configs: configs/ at the repository's top level, installed as cg3d_jax.configs.
CONFIG_DIR = pathlib.Path(str(importlib.resources.files('cg3d_jax.configs')))

CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config: the name of a shipped config (e.g. demo, pretrain_pointbert:8192; see configs/) '
  'or a Python file with get_config(arg), e.g. my_config.py:arg. Override any field with --config.<path>=<value>, '
  'e.g. --config.train.batch_size=32; unknown keys are errors.',
  lock_config=True,
)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics (JSONL + TensorBoard) and outputs.')
VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the full traceback of an input error, not only its message.')


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
  raise app.UsageError(
    f'--config {value!r}: no such file, and {name!r} is not a shipped config; shipped: {", ".join(shipped_configs())}'
  )


def _with_resolved_config(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
    elif arg.startswith('--config='):
      out[i] = '--config=' + resolve_config(arg[len('--config=') :])
  return out


def _stop(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_named_in(argv: list[str]):
  """The config --config names in argv (resolved), loaded afresh: ml_collections refuses an override while loading,
  before the flag holds a value."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith('--config='):
      value = arg[len('--config=') :]
    else:
      continue
    path, sep, config_arg = resolve_config(value).partition(':')
    spec = importlib.util.spec_from_file_location('cg3d_config_for_an_error', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if sep else module.get_config()
  return None


def _unknown_override(argv: list[str]) -> str | None:
  """The first --config.<path>=value whose path the config does not have, said with the fields it has."""
  config = _config_named_in(argv)
  for arg in argv:
    if not arg.startswith('--config.') or config is None:
      continue
    keys = arg[len('--config.') :].split('=', 1)[0].split('.')
    node = config
    for depth, key in enumerate(keys):
      if not hasattr(node, 'keys') or key not in node:
        parent = '.'.join(['config', *keys[:depth]])
        fields = sorted(node.keys()) if hasattr(node, 'keys') else []
        near = difflib.get_close_matches(key, fields, n=1)
        hint = f' (did you mean {near[0]}?)' if near else ''
        what = f'it has {", ".join(fields)}' if fields else f'it is a setting ({node!r}), not a section'
        return f'{arg}: {parent} has no field {key!r}{hint}; {what}'
      node = node[key]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (with --help), after turning a shipped config name into its file; a flag absl or
  ml_collections refuses (a value of the wrong type, an unknown config field, a missing value) is one `error:` line
  and exit status 2, as every other input error."""
  try:
    return flags.FLAGS(_with_resolved_config(argv))
  except app.UsageError as err:
    _stop(str(err))
  except flags.Error as err:
    _stop(_unknown_override(argv) or ' '.join(str(err).split()))
  except (AttributeError, KeyError, TypeError):  # ml_collections refusing an override of a field the config lacks
    message = _unknown_override(argv)
    if message is None:
      raise
    _stop(message)


def _leaves(config, prefix: str = ''):
  for key, value in config.items():
    path = f'{prefix}.{key}' if prefix else key
    if hasattr(value, 'items'):
      yield from _leaves(value, path)
    else:
      yield path, value


def named_settings(config, message: str) -> list[str]:
  """The settings of `config` an error message from library code names, as `config.<path>=<value>`: by their
  command-line spelling, or by their field name followed by their value ('width 128', "num_heads=3"), the way layers
  and libraries word their refusals."""
  found = []
  model = config.get('model') if hasattr(config, 'get') else None
  unread = ()  # the blocks of the encoders config.model.encoder does not name: their sizes are not what refused
  if model is not None and 'encoder' in model:
    unread = tuple(f'model.{k}.' for k, v in model.items() if hasattr(v, 'items') and k != model.encoder)
  for path, value in _leaves(config):
    if isinstance(value, (tuple, list, dict)) or value is None or path.startswith(unread):
      continue
    name, shown = re.escape(path.rsplit('.', 1)[-1]), re.escape(str(value))
    spelled = re.search(rf'(?<![\w.])config\.{re.escape(path)}(?![\w.])', message)
    if spelled or re.search(rf'(?<![\w.]){name}\W{{1,3}}{shown}(?![\w.])', message):
      found.append(f'config.{path}={value!r}')
  return found


def _settings_named_by(err: Exception) -> list[str]:
  return [] if CONFIG.value is None else named_settings(CONFIG.value, str(err))


def guard(main):
  """main, with input errors reported as one line: an `errors.InputError` (a bad file, setting or checkpoint; what
  the user can fix) prints `error: <message>` and exits with status 2 (its traceback too with --verbose), and so does
  a ValueError or TypeError whose message names a setting of the config (named_settings: a setting the
  validation let through that a library refused); any other exception is a bug and keeps its traceback."""

  def guarded(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
      return main(argv)
    except InputError as err:
      if VERBOSE.value:
        traceback.print_exc()
      _stop(str(err))
    except (ValueError, TypeError) as err:  # refused by library code: a setting's fault if it names one
      named = _settings_named_by(err)
      if not named:
        raise
      if VERBOSE.value:
        traceback.print_exc()
      message = ' '.join(str(err).split())
      unspelled = [setting for setting in named if setting.split('=')[0] not in message]
      _stop(f'{", ".join(unspelled)}: {message}' if unspelled else message)

  return guarded


def _list_command_flags_in_help(main) -> None:
  """absl's --help lists the key flags registered for sys.argv[0]'s module. Under `python -m cg3d_jax.<name>` that
  is the command's own module, but a console script's main module is its generated stub, so `cg3d-<name> --help`
  listed no flag at all; the command module's key flags are registered for sys.argv[0] too."""
  module = getattr(main, '__module__', '__main__')
  if module == '__main__' or not sys.argv:
    return
  for flag in flags.FLAGS.get_key_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main) -> None:
  """app.run(main) with --config names resolved and input errors as one line (`guard`): what every command's
  `if __name__ == '__main__'` and console script call."""
  _list_command_flags_in_help(main)
  app.run(guard(main), flags_parser=parse_flags)


def entry_point(main):
  """The zero-argument function that a command's console script and `python -m` call: run(main)."""
  return lambda: run(main)


@functools.cache
def checkpoint_flags() -> types.SimpleNamespace:
  """--checkpoint and --step, defined once for every command that reads a trained model."""
  return types.SimpleNamespace(
    checkpoint=flags.DEFINE_string(
      'checkpoint',
      None,
      'A training (or fine-tuning) workdir, its checkpoints/ '
      'folder or one step folder, or an original CG3D / exported .pth or '
      '.safetensors.',
    ),
    step=flags.DEFINE_integer('step', None, 'Checkpoint step to read (default: the newest).'),
  )


@functools.cache
def clip_flags() -> types.SimpleNamespace:
  """--clip_path and --num_points, for commands without a config that score with a trained model and its CLIP."""
  return types.SimpleNamespace(
    clip_path=flags.DEFINE_string(
      'clip_path',
      None,
      'The CLIP (a transformers folder or a SLIP .pt file), if not '
      'the one recorded in the checkpoint (an original CG3D .pth records none: pass '
      'the slip_base_100ep.pt it was trained with).',
    ),
    num_points=flags.DEFINE_integer(
      'num_points', 1024, "The encoder's input size, only for a .pth that does not record its config."
    ),
  )


# Flags that several commands take, each defined once (absl flags are global: commands imported into one process,
# as the tests do, would otherwise define them twice). Each command reads them its own way; their help says so.


@functools.cache
def out_flag():
  return flags.DEFINE_string(
    'out', None, 'Where the command writes: the export file (export), the output folder (query_scene, evaluate_scenes).'
  )


@functools.cache
def root_flag():
  return flags.DEFINE_string('root', None, 'The folder the command writes its procedural data into.')


@functools.cache
def seed_flag():
  return flags.DEFINE_integer(
    'seed', 0, 'Seed: of the room layouts (synthetic_scenes), of the points drawn per region (scene commands).'
  )


@functools.cache
def points_flag():
  return flags.DEFINE_multi_string(
    'points',
    None,
    'Point-cloud file(s): .ply .npy .off .txt .xyz .csv (predict takes '
    'one; export --verify compares on every one given).',
  )


@functools.cache
def library_flag():
  return flags.DEFINE_string('library', None, 'A shape-library folder (embed writes or extends it; search reads it).')


@functools.cache
def json_flag():
  return flags.DEFINE_string('json', None, 'Also write the result as JSON here.')


@functools.cache
def skip_bad_flag():
  return flags.DEFINE_bool(
    'skip_bad',
    False,
    'Skip bad files, each named in the log and counted, instead of stopping at the first one (build_data: raw '
    'dataset files; embed: shapes).',
  )


@functools.cache
def batch_size_flag():
  return flags.DEFINE_integer(
    'batch_size', 64, 'Clouds per device call, rounded up to the device count (scene regions; embed: shapes).'
  )


@functools.cache
def class_features_flag():
  return flags.DEFINE_string(
    'class_features',
    None,
    "Label features from a file instead of a CLIP's text tower, for encoders whose text tower the package cannot "
    "run (Uni3D's EVA02-E-14-plus; OpenShape's and ULIP-2's bigG without its folder): a .npz with `names` and "
    '`features` (labels x dim), matched to the labels by name (all of its names when no labels are given).',
  )


@functools.cache
def templates_flag():
  return flags.DEFINE_string(
    'templates',
    None,
    "Caption template set ('cg3d_zeroshot', 'cg3d', 'ulip', ...) or one "
    "template with {}; default: predict's 'cg3d_zeroshot', the scene commands' the "
    "checkpoint's eval.templates.",
  )


@functools.cache
def vocabulary_flag():
  return flags.DEFINE_string(
    'vocabulary',
    None,
    "Labels the queries compete with in each region: 'training' (the "
    "checkpoint's classes; query_scene's default), 's3dis' (its 13 classes; evaluate_scenes' "
    "default), 'none', or comma-separated words.",
  )


def require(flag, example: str):
  """The flag's value, or an input error naming the flag."""
  if flag.value in (None, '', []):
    raise InputError(f'--{flag.name} is required, e.g. {example}')
  return flag.value


def parse_labels(text: str, what: str = '--labels') -> list[str]:
  """'owl, chicken,penguin' -> ['owl', 'chicken', 'penguin']; empty or repeated labels are errors."""
  labels = [label.strip() for label in text.split(',')]
  if not text.strip() or any(not label for label in labels):
    raise InputError(f'{what} {text!r}: expected comma-separated non-empty labels, e.g. "owl,chicken,penguin"')
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  if repeated:
    raise InputError(f'{what} {text!r}: {repeated} appear more than once')
  return labels


def require_config():
  """The parsed config, or an input error when --config is missing."""
  if CONFIG.value is None:
    raise InputError('--config is required, e.g. --config demo (or a config file path)')
  return CONFIG.value


def require_workdir() -> str:
  """--workdir; an input error when it is missing or names a file. Not created here: what writes into it creates it
  (metrics, checkpoints, reports), after the settings were checked, so that a refused run leaves no empty folder."""
  workdir = require(WORKDIR, '--workdir /tmp/run (the directory for checkpoints, metrics and outputs)')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InputError(f'--workdir {workdir} is a file; expected a directory (new or existing)')
  return workdir
