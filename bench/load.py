"""The machine a benchmark ran on and how busy it was: every bench script prints this first.

A ratio taken under load can reverse on an idle machine (issue 23: the README's first CPU figures did), and CPU
ratios differ between processors of the same machine kind (issue 31: another AMD EPYC gave a JAX/PyTorch step-time
ratio of about 0.7 where this one gave about 0.9), so the processor's model, its vector instruction sets and the load
average are part of every figure; above 0.5 per core the script says the machine is busy.
"""

import os
import pathlib
import platform

# The vector extensions that decide how fast XLA's and PyTorch's CPU kernels run, in /proc/cpuinfo's names.
_ISA = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile', 'asimd', 'sve')


def cpu_model() -> str:
  """'<model name> (<ISA flags>)' from /proc/cpuinfo (Linux), else what the platform module says."""
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text(errors='replace')
  except OSError:
    return platform.processor() or platform.machine()
  fields = {}
  for line in text.splitlines():
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  name = fields.get('model name') or fields.get('Hardware') or platform.machine()
  flags = set((fields.get('flags') or fields.get('Features') or '').split())
  return f'{name} ({", ".join(f for f in _ISA if f in flags) or "no listed vector extensions"})'


def report() -> str:
  cores = os.cpu_count() or 1
  one, five, fifteen = os.getloadavg()
  line = f'machine: {cpu_model()}, {cores} CPUs; load average {one:.2f} {five:.2f} {fifteen:.2f}'
  if one > 0.5 * cores:
    line += (
      f'  WARNING: busy machine (1-min load {one:.2f} on {cores} cores): figures are inflated and ratios unreliable'
    )
  return line
