"""Files the package ships and reads at run time (package data): nothing is downloaded, nothing is read from beside
the installation. SOURCES.md in this folder names each file's origin and licence."""

import importlib.resources
import pathlib

# OpenAI's CLIP byte-pair vocabulary, as OpenAI CLIP, open_clip and SLIP ship it inside their packages.
BPE_VOCAB = 'bpe_simple_vocab_16e6.txt.gz'
# xyz of four real ModelNet40 objects (10,000 points each), the clouds `export --verify` compares on by default.
VERIFY_CLOUDS = 'modelnet40_verify_clouds.npz'


def path(name: str) -> pathlib.Path:
  """The installed file `name` of this folder (an error naming it when the installation lacks it)."""
  found = importlib.resources.files(__name__).joinpath(name)
  if not found.is_file():
    raise FileNotFoundError(
      f'package asset {name!r} is missing from {found}: the cg3d_jax installation is incomplete (reinstall it)'
    )
  return pathlib.Path(str(found))


def read_text(name: str) -> str:
  return path(name).read_text(encoding='utf-8')
