"""OpenAI CLIP's BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, shipped in cg3d_jax/assets) as token ids and merges.

OpenAI CLIP builds its 49,408-token vocabulary from the file: the 256 byte symbols, the same with `</w>`, one token
per merge for the first 48,894 merges, then <|startoftext|> and <|endoftext|>. transformers' CLIPTokenizer built from
these (vocab, merges) gives OpenAI's ids; SLIP's tokenizer is OpenAI's.
"""

import gzip
import pathlib

# OpenAI CLIP's 49152 - 256 - 2 merges (lines 1..48894 of the gz, after the version header line).
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT, END_OF_TEXT = '<|startoftext|>', '<|endoftext|>'


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP byte -> printable character table; its order fixes the ids of the 256 byte tokens."""
  printable = (
    list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  )
  codes = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in codes)))


def read_bpe(vocab_path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenAI's BPE gz -> (token -> id for all 49,408 tokens, the 48,894 merges in rank order)."""
  path = pathlib.Path(vocab_path)
  if not path.is_file():
    raise FileNotFoundError(f'CLIP BPE vocabulary {str(path)!r} not found (expected bpe_simple_vocab_16e6.txt.gz)')
  lines = gzip.open(path).read().decode('utf-8').split('\n')
  if len(lines) < NUM_MERGES + 1:
    raise ValueError(f'{path}: expected at least {NUM_MERGES + 1} lines, found {len(lines)}')
  merges = []
  for number, line in enumerate(lines[1 : NUM_MERGES + 1], start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f'{path}: line {number} is not a merge of two symbols: {line!r}')
    merges.append((parts[0], parts[1]))
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges] + [START_OF_TEXT, END_OF_TEXT]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f'{path}: merges produce duplicate tokens ({len(tokens) - len(vocab)} of them)')
  return vocab, merges
