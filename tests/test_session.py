"""The test session's own setup (tests/conftest.py): the compiled programs it keeps between runs and the XLA flags
that key them."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tests import conftest


def test_kept_programs_stay_until_they_outgrow_their_limit(tmp_path):
  """The folder is kept while its files, in every processor's subfolder, fit the limit, and emptied at the start once
  they do not (shown to fail with the emptying removed, and with the size summed over names instead of bytes)."""
  root = tmp_path / 'xla'
  folder = pathlib.Path(conftest.kept_programs(str(root), 1000))
  assert folder.parent == root and folder.is_dir() and folder.name == conftest.host_extensions()
  (folder / 'a-cache').write_bytes(b'x' * 600)
  (root / 'another_processor').mkdir()
  (root / 'another_processor' / 'b-cache').write_bytes(b'x' * 400)
  assert conftest.kept_programs(str(root), 1000) == str(folder)
  assert sorted(p.name for p in root.rglob('*-cache')) == ['a-cache', 'b-cache']
  (folder / 'c-cache').write_bytes(b'x')  # 1001 bytes now
  assert conftest.kept_programs(str(root), 1000) == str(folder) and os.listdir(root) == [folder.name]
  assert os.listdir(folder) == []


def test_the_subfolder_changes_with_the_processors_extensions_only(tmp_path):
  """Two processors that differ in one vector extension get two subfolders; a processor whose cpuinfo differs only
  in its model name and clock shares one (the code XLA emits depends on the extensions). Hand-written cpuinfo files;
  fails if the digest takes in the whole file, or misses the flags."""

  def cpuinfo(name, model, mhz, flags):
    path = tmp_path / name
    path.write_text(f'processor\t: 0\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n')
    return str(path)

  avx2 = 'fpu sse sse2 avx avx2 fma'
  base = conftest.host_extensions(cpuinfo('a', 'AMD EPYC 7B13', 2450.0, avx2))
  assert conftest.host_extensions(cpuinfo('b', 'AMD EPYC 9B14', 3100.0, avx2)) == base
  assert conftest.host_extensions(cpuinfo('c', 'AMD EPYC 9B14', 3100.0, avx2 + ' avx512f')) != base


def test_the_session_compiles_into_its_kept_folder():
  """The workers compile into the folder the main process chose (the variable they inherit), and JAX writes there: a
  program no run has compiled before (a random constant in it) adds an entry."""
  folder = os.environ['JAX_COMPILATION_CACHE_DIR']
  assert jax.config.jax_compilation_cache_dir == folder
  before = set(os.listdir(folder))
  constant = float(np.random.default_rng().uniform(1, 2))
  assert float(jax.jit(lambda x: x * constant)(jnp.float32(2.0))) == np.float32(2.0) * np.float32(constant)
  assert set(os.listdir(folder)) - before


def test_each_session_flag_is_named_once_in_every_process():
  """JAX's cache key hashes XLA_FLAGS as written, so the flags must read the same in pytest's main process, in each
  worker (which imports conftest again with the main process's flags) and in a one-process run: each flag named
  once, the session's values replacing a caller's. Fails in a worker with the flags appended at every import."""
  flags = os.environ['XLA_FLAGS'].split()
  assert len(flags) == len({flag.split('=')[0] for flag in flags})
  assert set(conftest.SESSION_XLA_FLAGS) <= set(flags)
  given = '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4'
  once = conftest.session_xla_flags(given)
  assert once.split() == [
    '--xla_dump_to=/tmp/d',
    '--xla_force_host_platform_device_count=8',
    '--xla_cpu_multi_thread_eigen=false',
  ]
  assert conftest.session_xla_flags(once) == once
