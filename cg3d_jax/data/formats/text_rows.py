"""Rows of numbers in text: the one parser of the fixed-width numeric tables the package reads (text point files,
ASCII PLY and OFF vertex rows, ModelNet40's resampled files, S3DIS rooms). Face lists, whose rows differ in length,
are the mesh readers' own.

A format chooses its separator and, if it has one, its column count, and words its own error; what a number is,
what a bad line is, and how bad lines are named or skipped are the same for all of them. NumPy's C parser reads
well-formed input; only when it refuses are the lines split one by one, which either names the first bad line,
drops the bad lines (when the caller collects them), or accepts input that NumPy's parser does not (a file that
mixes commas and spaces).
"""

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from cg3d_jax.errors import BadInputError

COMMAS = 'commas'  # `x,y,z,nx,ny,nz` (ModelNet40): each comma separates two fields, so an empty field is bad
SPACES = 'spaces'  # `x y z r g b` (S3DIS): runs of whitespace
COMMAS_OR_SPACES = 'commas or spaces'  # point files, PLY and OFF bodies: any run of commas and/or whitespace


@dataclasses.dataclass(frozen=True)
class BadRow:
  """A non-blank line that is not a row of `expected` numbers."""

  line_number: int  # 1-based
  line: str | bytes  # as given
  found: int  # fields on the line
  expected: int
  token: str | bytes | None  # the first field that is not a number; None when the field count is wrong


class Rows(NamedTuple):
  values: np.ndarray  # (rows, columns) float64
  line_numbers: np.ndarray  # (rows,) int64: the line each row came from


def parse_rows(
  path,
  lines: Sequence[str] | Sequence[bytes],
  line_numbers: Sequence[int],
  what: str = 'row',
  *,
  separator: str = COMMAS_OR_SPACES,
  columns: int | None = None,
  error: Callable[[BadRow], Exception] | None = None,
  skipped: list[BadRow] | None = None,
  numpy_first: bool = True,
) -> Rows:
  """Rows of numbers from text lines (str, or bytes as read), each with its 1-based line number; blank lines are
  not rows.

  columns: how many numbers a row holds; None: as many as the first row.
  error: the exception for the first bad line (default: `BadInputError` naming `path`, the line and `what`).
  skipped: when a list, bad lines are appended to it as `BadRow`s and left out instead of raising.
  numpy_first: False when the caller's own fast parser has already refused these lines.
  """
  if numpy_first and lines:
    parsed = _parse_with_numpy(lines, separator, columns)
    if parsed is not None:
      return Rows(parsed, np.asarray(line_numbers, dtype=np.int64))
  rows, kept, expected = [], [], columns
  for line, number in zip(lines, line_numbers):
    if not line.strip():
      continue
    fields = _fields(line, separator)
    expected = len(fields) if expected is None else expected
    row = _numbers(fields) if len(fields) == expected else None
    if row is not None:
      rows.append(row)
      kept.append(number)
      continue
    token = _first_non_number(fields) if len(fields) == expected else None
    bad = BadRow(number, line, len(fields), expected, token)
    if skipped is None:
      raise (error or _default_error(path, what))(bad)
    skipped.append(bad)
  values = np.array(rows, dtype=np.float64).reshape(len(rows), expected or 0)
  return Rows(values, np.asarray(kept, dtype=np.int64))


def _parse_with_numpy(lines, separator: str, columns: int | None) -> np.ndarray | None:
  """The whole table from NumPy's parser, or None when it refuses the lines or reads other than one row per line
  of `columns` numbers."""
  comma = ',' if isinstance(lines[0], str) else b','
  delimiter = ',' if separator == COMMAS or (separator == COMMAS_OR_SPACES and comma in lines[0]) else None
  try:
    values = np.loadtxt(lines, delimiter=delimiter, comments=None, dtype=np.float64, ndmin=2)
  except ValueError:
    return None
  if values.shape[0] != len(lines) or (columns is not None and values.shape[1] != columns):
    return None
  return values


def _fields(line, separator: str) -> list:
  if separator == SPACES:
    return line.split()
  comma, space = (',', ' ') if isinstance(line, str) else (b',', b' ')
  return line.split(comma) if separator == COMMAS else line.replace(comma, space).split()


def _number(field) -> float:
  # Python's float() reads `1_000`, which NumPy's parsers refuse: refused here too, so that whether a file parses
  # does not depend on which path read it.
  if ('_' if isinstance(field, str) else b'_') in field:
    raise ValueError(field)
  return float(field)


def _numbers(fields) -> list[float] | None:
  try:
    return [_number(f) for f in fields]
  except ValueError:
    return None


def _first_non_number(fields):
  for field in fields:
    try:
      _number(field)
    except ValueError:
      return field
  return None


def _default_error(path, what: str) -> Callable[[BadRow], Exception]:
  def error(bad: BadRow) -> Exception:
    if bad.token is None:
      message = f'{what}: expected {bad.expected} numbers (as on the first row), found {bad.found}'
    else:
      message = f'{what}: {bad.token!r} is not a number'
    return BadInputError(path, message, bad.line_number)

  return error


def text_lines(path, data: bytes) -> tuple[list[str], Sequence[int]]:
  """Non-blank lines without '#' comments, with their 1-based line numbers."""
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise BadInputError(path, f'not a text file (byte {e.start} is not UTF-8)') from None
  raw = text.rstrip().splitlines()
  if '#' not in text:
    stripped = [line.strip() for line in raw]
    if all(stripped):  # the common case, without a Python-level loop per line
      return stripped, range(1, len(stripped) + 1)
  lines, numbers = [], []
  for number, line in enumerate(raw, start=1):
    line = line.split('#', 1)[0].strip()
    if line:
      lines.append(line)
      numbers.append(number)
  return lines, numbers
