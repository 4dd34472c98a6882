"""A stand-in worker for launch/local_multihost.sh in tests/test_multihost.py (`CG3D_MODULE=tests.launcher_stand_in`):
prints what the launcher gave it; `--fail_process i` makes process i exit with status 3 after 2 s, the others sleep
for 10 minutes (the launcher must stop them). Standard library only, so that each of the launched processes starts
in a fraction of a second instead of importing JAX."""

import os
import sys
import time


def main(argv):
  index, count = int(os.environ['CG3D_PROCESS_ID']), int(os.environ['CG3D_NUM_PROCESSES'])
  devices = os.environ['XLA_FLAGS'].split('device_count=')[1].split()[0]
  print(f'worker {index} of {count}, devices={devices}, coordinator={os.environ["CG3D_COORDINATOR"]}', flush=True)
  if index == int(argv[argv.index('--fail_process') + 1]):
    time.sleep(2)
    sys.exit(3)
  time.sleep(600)


if __name__ == '__main__':
  main(sys.argv[1:])
