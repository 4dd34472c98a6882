"""One metrics writer for training and evaluation: TensorBoard scalars plus a JSONL file in the workdir.

TensorBoard events are written with tensorboard's own event writer, so logging needs no TensorFlow session.
The JSONL file (one `{"step": ..., name: value, ...}` object per line) is what scripts and tests read back.
Only process 0 writes; other processes get a writer that does nothing, so callers need no rank checks.
"""

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _to_float(name: str, value: Any) -> float:
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError) as e:
    raise TypeError(f'metric {name!r} must be a scalar number, got {type(value).__name__}: {value!r}') from e


class MetricsWriter:
  """Writes scalar metrics to `<workdir>/<name>.jsonl` and TensorBoard events under `<workdir>/tb/<name>`."""

  def __init__(
    self,
    workdir: str,
    name: str = 'train',
    *,
    tensorboard: bool = True,
    jsonl: bool = True,
    enabled: bool | None = None,
    resume_step: int | None = None,
  ):
    """resume_step: the step a resumed run restarts from. Rows the earlier run wrote after it (steps that will be
    run again) are dropped from the JSONL file, with a log line, so that no step is written twice."""
    if enabled is None:
      import jax  # imported lazily so that data-only tools can use the writer without initialising JAX

      enabled = jax.process_index() == 0
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if jsonl:
      self.jsonl_path = os.path.join(workdir, f'{name}.jsonl')
      if resume_step is not None and os.path.exists(self.jsonl_path):
        _drop_rows_after(self.jsonl_path, resume_step)
      self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    if tensorboard:
      self.tb_dir = os.path.join(workdir, 'tb', name)
      self._tb = EventFileWriter(self.tb_dir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _to_float(k, v) for k, v in scalars.items()}
    if self._jsonl is not None:
      # JSON has no NaN/Inf; write them as strings so that a diverging run is still readable.
      row = {'step': int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    if self._tb is not None:
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _drop_rows_after(path: str, step: int) -> None:
  """Keeps the rows of steps <= `step` (and drops a last line cut by a kill), rewriting the file atomically."""
  from absl import logging

  from cg3d_jax.atomic import atomic_write_bytes

  with open(path, encoding='utf-8') as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  kept, dropped, cut = [], 0, 0
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      cut += 1  # a line the killed run did not finish
      continue
    if int(row.get('step', 0)) > step:
      dropped += 1
    else:
      kept.append(line)
  if dropped or cut:
    logging.warning(
      '%s: resuming at step %d, dropped %d row(s) of later steps (they are run again)%s',
      path,
      step,
      dropped,
      f' and {cut} unfinished line(s)' if cut else '',
    )
    atomic_write_bytes(path, ''.join(line + '\n' for line in kept).encode('utf-8'))
