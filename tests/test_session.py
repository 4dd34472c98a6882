"""The test session's own setup (tests/conftest.py): the compiled programs it keeps between runs."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from tests import conftest


def test_kept_programs_stay_until_they_outgrow_their_limit(tmp_path):
  """The folder is kept while its files fit the limit and emptied at the start once they do not (shown to fail with
  the emptying removed, and with the size summed over names instead of bytes)."""
  folder = tmp_path / 'xla'
  folder.mkdir()
  (folder / 'a-cache').write_bytes(b'x' * 600)
  (folder / 'b-cache').write_bytes(b'x' * 400)
  assert conftest.kept_programs(str(folder), 1000) == str(folder)
  assert sorted(os.listdir(folder)) == ['a-cache', 'b-cache']
  (folder / 'c-cache').write_bytes(b'x')  # 1001 bytes now
  assert conftest.kept_programs(str(folder), 1000) == str(folder) and os.listdir(folder) == []
  assert conftest.kept_programs(str(tmp_path / 'new'), 1000) and (tmp_path / 'new').is_dir()


def test_the_session_compiles_into_its_kept_folder():
  """The workers compile into the folder the main process chose (the variable they inherit), and JAX writes there: a
  program no run has compiled before (a random constant in it) adds an entry."""
  folder = os.environ['JAX_COMPILATION_CACHE_DIR']
  assert jax.config.jax_compilation_cache_dir == folder
  before = set(os.listdir(folder))
  constant = float(np.random.default_rng().uniform(1, 2))
  assert float(jax.jit(lambda x: x * constant)(jnp.float32(2.0))) == np.float32(2.0) * np.float32(constant)
  assert set(os.listdir(folder)) - before
