"""Test session setup: 8 simulated CPU devices, the shared fixtures folder, and shared expensive objects.

XLA_FLAGS must be set before JAX is first imported, so it lives at the very top of this file.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests must never reach a hub
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / 'shared' / 'fixtures'


@pytest.fixture(scope='session')
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f'shared fixtures not found at {FIXTURES}: the repository must sit beside ../shared')
  return FIXTURES


@pytest.fixture
def highest_precision():
  """fp32 matmuls at full precision for parity tests (CPU default is already exact; accelerators are not)."""
  with jax.default_matmul_precision('highest'):
    yield
