"""The errors a user can fix: bad files, settings and checkpoints. Commands print their message as one line
(`error: ...`) and exit with status 2; anything else is a bug and keeps its traceback (cli.run)."""

import os


class InputError(ValueError):
  """Input a user can fix; the message names the file or setting and what was expected."""


class BadInputError(InputError):
  """A file (or a part of one) that cannot be used: missing, unreadable, or holding values that are not allowed.

  BadInputError(message), or BadInputError(path, message[, line]) which prefixes `path[, line N]: `.
  """

  def __init__(self, where, message: str | None = None, line: int | None = None):
    self.reason = str(where) if message is None else message  # the message without its place
    if message is None:
      super().__init__(str(where))
    else:
      place = f'{os.fspath(where)}, line {line}' if line is not None else os.fspath(where)
      super().__init__(f'{place}: {message}')


class ConfigError(InputError):
  """A config value (or command-line setting) that cannot work; the message names the field."""
