"""The machine a benchmark ran on and how busy it was: every bench script prints this first.

A ratio taken under load can reverse on an idle machine (issue 23: the README's first CPU figures did), so the
load average is part of every figure; above 0.5 per core the script says the machine is busy.
"""

import os
import platform


def report() -> str:
  cores = os.cpu_count() or 1
  one, five, fifteen = os.getloadavg()
  line = (f'machine: {platform.processor() or platform.machine()}, {cores} CPUs; load average {one:.2f} {five:.2f} '
          f'{fifteen:.2f}')
  if one > 0.5 * cores:
    line += (f'  WARNING: busy machine (1-min load {one:.2f} on {cores} cores): figures are inflated and ratios '
             'unreliable')
  return line
