"""The frozen CLIP as loaded, whichever family it comes from: `load_clip(path)` tells a transformers CLIP folder
(hf_clip.py) from a SLIP checkpoint file (slip.py) by what the path is (nothing is downloaded), and what every CLIP
shares: the loaded model (`LoadedCLIP`), CLIP's image preprocessing, tokenizing to fixed-length ids, the Flax
parameter shapes both families' name tables are checked against, and the one error type of a CLIP that cannot be
loaded."""

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from cg3d_jax.errors import InputError
from cg3d_jax.models.clip import CLIP, CLIPSpec
from cg3d_jax.trees import flatten, unstack_layers


class CLIPLoadError(InputError):
  """A CLIP folder that cannot be loaded; the message names the file or tensor and what was expected."""


@dataclasses.dataclass
class ImagePreprocess:
  """CLIPImageProcessor's steps in NumPy/PIL: shortest side to `size` (bicubic), centre crop, /255, normalise."""

  size: int
  crop_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resample: int = Image.Resampling.BICUBIC
  crop_offset: str = 'floor'  # transformers floors the centre crop's offset; torchvision ('round') rounds it

  @classmethod
  def from_config(cls, config: dict, source: str = 'preprocessor_config.json') -> 'ImagePreprocess':
    def shortest_edge(value, key):
      if isinstance(value, dict):
        if 'shortest_edge' in value:
          return int(value['shortest_edge'])
        if value.get('height') is not None and value.get('height') == value.get('width'):
          return int(value['height'])
      elif isinstance(value, (int, float)):
        return int(value)
      raise CLIPLoadError(
        f'{source}: {key} must be an int or {{"shortest_edge": n}} or a square '
        f'{{"height": n, "width": n}}, got {value!r}'
      )

    def crop(value):
      if isinstance(value, dict) and value.get('height') is not None and value.get('height') == value.get('width'):
        return int(value['height'])
      if isinstance(value, (int, float)):
        return int(value)
      raise CLIPLoadError(f'{source}: crop_size must be square, got {value!r}')

    for key in ('size', 'crop_size', 'image_mean', 'image_std'):
      if key not in config:
        raise CLIPLoadError(f'{source}: missing {key!r}')
    for flag in ('do_resize', 'do_center_crop', 'do_rescale', 'do_normalize'):
      if config.get(flag, True) is False:
        raise CLIPLoadError(
          f'{source}: {flag}=false is not supported (CLIP preprocessing resizes, crops, rescales and normalises)'
        )
    mean, std = tuple(float(m) for m in config['image_mean']), tuple(float(s) for s in config['image_std'])
    if len(mean) != 3 or len(std) != 3:
      raise CLIPLoadError(f'{source}: image_mean and image_std need 3 values, got {mean} and {std}')
    size, crop_size = shortest_edge(config['size'], 'size'), crop(config['crop_size'])
    if crop_size > size:
      raise CLIPLoadError(f'{source}: crop_size {crop_size} is larger than the resized shortest side {size}')
    return cls(
      size=size, crop_size=crop_size, mean=mean, std=std, resample=int(config.get('resample', Image.Resampling.BICUBIC))
    )

  def resized_shape(self, height: int, width: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated, not rounded.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = self.size, int(self.size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  def __call__(self, image) -> np.ndarray:
    """PIL image or uint8 (H, W, 3) array -> float32 (crop, crop, 3)."""
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'expected a uint8 (H, W, 3) image array, got {image.dtype} {image.shape}')
      image = Image.fromarray(image)
    image = image.convert('RGB')
    height, width = self.resized_shape(image.height, image.width)
    pixels = np.asarray(image.resize((width, height), resample=self.resample))
    if self.crop_offset == 'round':
      top, left = int(round((height - self.crop_size) / 2)), int(round((width - self.crop_size) / 2))
    else:
      top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
    pixels = pixels[top : top + self.crop_size, left : left + self.crop_size]
    # Same arithmetic as transformers: rescale in float64, cast to float32, then normalise in float32.
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def pipeline_settings(self) -> dict:
    """The data pipeline's image arguments (its TF resize follows `resample`: bicubic or bilinear)."""
    resample = {Image.Resampling.BICUBIC: 'bicubic', Image.Resampling.BILINEAR: 'bilinear'}.get(self.resample)
    if resample is None:
      raise CLIPLoadError(
        f'image resample mode {self.resample} is not supported by the data pipeline (bicubic or bilinear)'
      )
    return dict(
      image_size=self.crop_size, image_mean=tuple(self.mean), image_std=tuple(self.std), image_resample=resample
    )


@dataclasses.dataclass
class LoadedCLIP:
  """A frozen CLIP ready to use: the Flax module, its parameters, how to tokenize and how to preprocess images."""

  model: CLIP
  params: dict
  tokenizer: Any  # transformers' CLIPTokenizer, or anything with token_ids(texts, context_length) (SLIP's framing)
  preprocess: ImagePreprocess
  spec: CLIPSpec
  hf_config: Any  # None for SLIP
  kind: str = 'transformers'  # 'transformers' (a folder) or 'slip' (a checkpoint file)
  source: str = ''


def expected_shapes(spec: CLIPSpec) -> dict[str, tuple[int, ...]]:
  """Flax path -> parameter shape of the frozen CLIP (everything except the prompts), layers one by one
  ('vision/layers_0/...'), the layout the name tables use."""
  model = CLIP(spec)
  pixels = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, spec.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, spec.max_positions), jnp.int32)
  shapes = jax.eval_shape(lambda p, i: unstack_layers(model.init(jax.random.key(0), p, i)['params']), pixels, ids)
  return {name: tuple(leaf.shape) for name, leaf in flatten(shapes).items()}


def tokenize(tokenizer, texts: list[str], context_length: int | None = None) -> np.ndarray:
  """Texts -> int32 (N, L) ids: <|startoftext|> ... <|endoftext|>, padded with the tokenizer's pad token to L.

  L defaults to the tokenizer's model_max_length (77 for CLIP). Longer texts are truncated keeping the
  end-of-text token, which is where CLIP pools, with a warning.
  """
  if isinstance(texts, str):
    raise TypeError('tokenize takes a list of strings, got a single string')
  if hasattr(tokenizer, 'token_ids'):  # SLIP's framing (weights/slip.py)
    return tokenizer.token_ids(list(texts), context_length)
  if context_length is None:
    context_length = tokenizer.model_max_length
    if context_length is None or context_length > 100_000:  # transformers' "no limit" sentinel
      raise ValueError('the tokenizer has no model_max_length; pass context_length (77 for CLIP)')
  # Encoded in full, then cut as transformers cuts (keeping <|endoftext|>, where CLIP pools), so that a cut is seen.
  out = np.full((len(texts), context_length), tokenizer.pad_token_id, np.int32)
  cut = []
  for row, ids in enumerate(tokenizer(list(texts), verbose=False)['input_ids']):
    if len(ids) > context_length:
      cut.append(texts[row])
      ids = ids[: context_length - 1] + ids[-1:]
    out[row, : len(ids)] = ids
  if cut:
    logging.warning(
      '%d text(s) longer than the %d-token context were cut (the end kept only its end-of-text token), e.g. %r',
      len(cut),
      context_length,
      cut[0][:80],
    )
  return out


def is_slip_path(path) -> bool:
  return pathlib.Path(os.path.expanduser(str(path))).is_file()


def load_clip(
  path,
  *,
  prompt_mode: str = 'deep',
  num_prompts: int = 5,
  dtype=jnp.float32,
  remat='none',
  attention: str = 'auto',
  scan_layers: bool = True,
  seed: int = 0,
) -> LoadedCLIP:
  """A transformers CLIP folder or a SLIP `.pt` file; prompts (if any) freshly initialised from `seed`."""
  kwargs = dict(
    prompt_mode=prompt_mode,
    num_prompts=num_prompts,
    dtype=dtype,
    remat=remat,
    attention=attention,
    scan_layers=scan_layers,
    seed=seed,
  )
  from cg3d_jax.clip import hf_clip, slip  # each family imports this module for what every CLIP shares

  if is_slip_path(path):
    return slip.load_slip(pathlib.Path(os.path.expanduser(str(path))), **kwargs)
  return hf_clip.load_transformers_clip(path, **kwargs)
