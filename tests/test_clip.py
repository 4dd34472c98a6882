"""Flax CLIP against transformers' PyTorch CLIPModel, CG3D prompts against a PyTorch reference, loader errors.

Inputs are real: the OpenShape photos through our preprocessing, captions through the tokenizer built from the real
CLIP BPE file. Weights are random (nothing can be downloaded) but written by transformers' own `save_pretrained`.
"""

import functools
import gzip
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from cg3d_jax import assets
from cg3d_jax.clip import hf_clip
from cg3d_jax.clip.loaded_clip import CLIPLoadError, ImagePreprocess, tokenize
from cg3d_jax.models.clip import CLIP, EOS_POOLING_ARGMAX, EOS_POOLING_FIRST_EOS, prompt_init_bound
from cg3d_jax.models.layers import attend
from cg3d_jax.synthetic import random_clip
from cg3d_jax.trees import unstack_layers
from cg3d_jax.twins.prompted_clip import torch_prompted_image_features

CAPTIONS = ['a photo of an owl.', 'a chicken standing on grass', 'a penguin']
PHOTOS = ('a', 'b', 'c')


@pytest.fixture(scope='session')
def bpe_path():
  return assets.path(assets.BPE_VOCAB)


@pytest.fixture(scope='session')
def photos(fixtures_dir):
  return [Image.open(fixtures_dir / 'openshape_owl' / f'{name}.jpg') for name in PHOTOS]


@pytest.fixture(scope='session')
def small_folder(tmp_path_factory, bpe_path):
  # Old-style config (eos_token_id 2, argmax pooling) with QuickGELU, as OpenAI's released configs.
  return random_clip.write_random_clip(tmp_path_factory.mktemp('clip') / 'small', vocab_path=bpe_path, seed=0)


@pytest.fixture(scope='session')
def gelu_folder(tmp_path_factory, bpe_path):
  # New-style eos pooling, exact GELU, odd sizes, and two added tokens above <|endoftext|>.
  return random_clip.write_random_clip(
    tmp_path_factory.mktemp('clip') / 'gelu',
    vocab_path=bpe_path,
    seed=1,
    vision_width=48,
    vision_layers=3,
    vision_heads=3,
    patch_size=16,
    image_size=48,
    text_width=40,
    text_layers=3,
    text_heads=5,
    projection_dim=24,
    hidden_act='gelu',
    eos_token_id=49407,
    vocab_size=49410,
    layer_norm_eps=1e-6,
  )


@pytest.fixture(scope='session')
def b16_folder(tmp_path_factory, bpe_path):
  return random_clip.write_random_clip(
    tmp_path_factory.mktemp('clip') / 'b16', vocab_path=bpe_path, seed=2, **random_clip.VIT_B16
  )


@pytest.fixture(scope='session')
def small_deep(small_folder):
  return hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', num_prompts=5, seed=3)


@pytest.fixture(scope='session')
def small_plain(small_folder):
  return hf_clip.load_transformers_clip(small_folder, prompt_mode='none')


@pytest.fixture(scope='session')
def small_torch(small_folder):
  return CLIPModel.from_pretrained(small_folder, local_files_only=True).eval()


def _pixels(loaded, images):
  return np.stack([loaded.preprocess(image) for image in images])


def _encode_image(loaded, pixels):
  return np.asarray(
    jax.jit(functools.partial(loaded.model.apply, method=CLIP.encode_image))({'params': loaded.params}, pixels)
  )


def _torch_outputs(torch_model, pixels, ids):
  with torch.no_grad():
    out = torch_model(
      input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))
    )
  return {k: getattr(out, k).numpy() for k in ('image_embeds', 'text_embeds', 'logits_per_image', 'logits_per_text')}


def _max_diffs(ours, theirs):
  return {k: float(np.abs(np.asarray(ours[k]) - theirs[k]).max()) for k in theirs}


def _assert_parity(ours, theirs):
  diffs = _max_diffs(ours, theirs)
  assert diffs['image_embeds'] <= 1e-5 and diffs['text_embeds'] <= 1e-5, diffs
  assert diffs['logits_per_image'] <= 1e-4 and diffs['logits_per_text'] <= 1e-4, diffs


# --- tokenizer and preprocessing ------------------------------------------------------------------------------------


def test_tokenizer_gives_original_clip_ids(small_folder, small_plain, bpe_path, tmp_path):
  tokenizer = small_plain.tokenizer
  ids = tokenize(tokenizer, ['a photo of a chair.'])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  # Ids by hand from OpenAI's construction: 256 byte symbols ('!'..'~' first, so 'a' is symbol 64), the same 256
  # with '</w>' (ids 256..511), then one token per merge line of the gz in order (ids 512..).
  merged = [''.join(line.split()) for line in gzip.open(bpe_path).read().decode('utf-8').split('\n')[1:48895]]
  by_hand = {'a</w>': 256 + (ord('a') - ord('!')), '.</w>': 256 + (ord('.') - ord('!'))}
  for word in ('photo</w>', 'of</w>', 'chair</w>'):
    by_hand[word] = 512 + merged.index(word)
  assert by_hand == {'a</w>': 320, '.</w>': 269, 'photo</w>': 1125, 'of</w>': 539, 'chair</w>': 4269}
  expected = [49406, 320, 1125, 539, 320, 4269, 269, 49407]
  np.testing.assert_array_equal(ids[0, :8], expected)
  np.testing.assert_array_equal(ids[0, 8:], 49407)  # transformers' CLIP pads with <|endoftext|>

  # The classic vocab.json + merges.txt alone give the same tokenizer (older loaders read only those two files).
  for name in ('vocab.json', 'merges.txt'):
    shutil.copy(f'{small_folder}/{name}', tmp_path / name)
  classic = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert classic('a photo of a chair.')['input_ids'] == expected


def test_tokenize_truncates_keeping_end_of_text(small_deep):
  ids = tokenize(small_deep.tokenizer, ['word ' * 100, 'short'], context_length=16)
  assert ids.shape == (2, 16)
  assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and np.all(ids[0, 1:-1] == ids[0, 1])


def test_preprocessing_matches_clip_image_processor(small_deep, small_folder, photos):
  # The PIL backend of CLIPImageProcessor (the torchvision backend needs torchvision, which is not installed).
  processor = CLIPImageProcessorPil.from_pretrained(small_folder, local_files_only=True)
  theirs = processor(images=photos, return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  ours = _pixels(small_deep, photos)
  assert ours.dtype == np.float32 and ours.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
  from_array = small_deep.preprocess(np.asarray(photos[1].convert('RGB')))
  np.testing.assert_array_equal(from_array, ours[1])


def test_preprocessing_non_square_photo_at_b16_size(photos):
  preprocess = ImagePreprocess.from_config(random_clip.preprocessor_config(224))
  processor = CLIPImageProcessorPil(**random_clip.preprocessor_config(224))
  image = photos[0].crop((0, 0, photos[0].width, photos[0].height * 2 // 3))  # make the photo clearly landscape
  theirs = processor(images=[image], return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  np.testing.assert_allclose(preprocess(image), theirs, rtol=0, atol=1e-6)


# --- parity with transformers ---------------------------------------------------------------------------------------


def test_small_config_matches_transformers(small_plain, small_torch, photos, highest_precision):
  loaded = small_plain
  assert loaded.spec.eos_pooling == EOS_POOLING_ARGMAX and loaded.spec.vision_activation == 'quick_gelu'
  assert 'prompts' not in loaded.params
  pixels, ids = _pixels(loaded, photos), tokenize(loaded.tokenizer, CAPTIONS)
  ours = jax.jit(loaded.model.apply)({'params': loaded.params}, pixels, ids)
  _assert_parity(ours, _torch_outputs(small_torch, pixels, ids))


def test_gelu_new_eos_config_matches_transformers(gelu_folder, photos, highest_precision):
  loaded = hf_clip.load_transformers_clip(gelu_folder, prompt_mode='none')
  assert loaded.spec.eos_pooling == EOS_POOLING_FIRST_EOS and loaded.spec.text_activation == 'gelu'
  torch_model = CLIPModel.from_pretrained(gelu_folder, local_files_only=True).eval()
  pixels = _pixels(loaded, photos)
  ids = tokenize(loaded.tokenizer, CAPTIONS, context_length=20)
  # A row with an added token (49409) before <|endoftext|>: argmax pooling would pick position 2, first-eos
  # pooling picks position 4. Only the rule transformers applies to this config gives parity.
  ids[2, :6] = [49406, 320, 49409, 1125, 49407, 49407]
  ids[2, 6:] = 49407
  ours = jax.jit(loaded.model.apply)({'params': loaded.params}, pixels, ids)
  _assert_parity(ours, _torch_outputs(torch_model, pixels, ids))


def test_vit_b16_config_matches_transformers(b16_folder, photos, highest_precision):
  loaded = hf_clip.load_transformers_clip(b16_folder, prompt_mode='none')
  s = loaded.spec
  assert (s.vision_width, s.vision_layers, s.vision_heads, s.patch_size, s.image_size) == (768, 12, 12, 16, 224)
  assert (s.text_width, s.text_layers, s.text_heads, s.projection_dim) == (512, 12, 8, 512)
  torch_model = CLIPModel.from_pretrained(b16_folder, local_files_only=True).eval()
  pixels, ids = _pixels(loaded, photos[:2]), tokenize(loaded.tokenizer, CAPTIONS)
  ours = jax.jit(loaded.model.apply)({'params': loaded.params}, pixels, ids)
  _assert_parity(ours, _torch_outputs(torch_model, pixels, ids))


def test_attention_kernels_match_numpy_and_each_other(small_folder, photos, highest_precision):
  """attend() against NumPy (float64 softmax of q k^T / sqrt(d), causal mask for text) for every implementation that
  runs on this machine, then the whole prompted CLIP with the default kernel against the einsum form."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 77, 4, 32)).astype(np.float32) for _ in range(3))
  for causal in (False, True):
    logits = np.einsum('bqhd,bkhd->bhqk', q.astype(np.float64), k.astype(np.float64)) / np.sqrt(32)
    if causal:
      logits = np.where(np.tril(np.ones((77, 77), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum('bhqk,bkhd->bqhd', weights / weights.sum(-1, keepdims=True), v.astype(np.float64))
    for impl in ('einsum', 'xla', 'auto'):
      got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, implementation=impl))
      np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=f'{impl} causal={causal}')
  with pytest.raises(ValueError, match='attention implementation must be one of'):
    attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation='flash')

  outputs = {}
  for impl in ('einsum', 'auto'):
    loaded = hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', num_prompts=5, seed=3, attention=impl)
    pixels, ids = _pixels(loaded, photos), tokenize(loaded.tokenizer, CAPTIONS)
    outputs[impl] = jax.jit(loaded.model.apply)({'params': loaded.params}, pixels, ids)
  for key in ('image_embeds', 'text_embeds'):
    np.testing.assert_allclose(np.asarray(outputs['auto'][key]), np.asarray(outputs['einsum'][key]), atol=1e-6, rtol=0)


# --- prompts --------------------------------------------------------------------------------------------------------


def test_prompt_parameters_layout(small_folder, small_deep):
  width, layers = small_deep.spec.vision_width, small_deep.spec.vision_layers
  tokens = small_deep.params['prompts']['tokens']
  assert set(small_deep.params) == {'vision', 'text', 'visual_projection', 'text_projection', 'logit_scale', 'prompts'}
  assert tokens.shape == (layers, 5, width) and tokens.dtype == jnp.float32
  bound = prompt_init_bound(width)
  assert bound == pytest.approx(np.sqrt(6 / (48 + width)))
  assert float(jnp.abs(tokens).max()) <= bound and float(jnp.abs(tokens).max()) > 0.8 * bound
  shallow = hf_clip.load_transformers_clip(small_folder, prompt_mode='shallow', num_prompts=3)
  assert shallow.params['prompts']['tokens'].shape == (1, 3, width)
  # The module's own initialiser builds the same tree as the loader.
  init_shapes = jax.eval_shape(
    small_deep.model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32)
  )['params']
  assert jax.tree.map(lambda a: a.shape, init_shapes) == jax.tree.map(lambda a: a.shape, small_deep.params)


@pytest.mark.parametrize('mode', ['shallow', 'deep'])
def test_prompted_image_tower_matches_torch_reference(
  mode, small_folder, small_plain, small_torch, photos, highest_precision
):
  loaded = hf_clip.load_transformers_clip(small_folder, prompt_mode=mode, num_prompts=5, seed=4)
  pixels = _pixels(loaded, photos)
  prompts = np.asarray(loaded.params['prompts']['tokens'])
  ours = _encode_image(loaded, pixels)
  with torch.no_grad():
    theirs = torch_prompted_image_features(
      small_torch, torch.tensor(pixels.transpose(0, 3, 1, 2)), torch.tensor(prompts)
    ).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1.0, np.abs(theirs).max()))
  plain = small_plain
  unprompted = _encode_image(plain, pixels)
  assert np.abs(ours - unprompted).max() > 1e-3  # the prompts do change the features
  # The text tower carries no prompts: its output is plain CLIP's.
  ids = tokenize(loaded.tokenizer, CAPTIONS)
  np.testing.assert_array_equal(
    loaded.model.apply({'params': loaded.params}, ids, method=CLIP.encode_text),
    plain.model.apply({'params': plain.params}, ids, method=CLIP.encode_text),
  )


def _image_loss_fn(loaded, pixels, direction):
  frozen = {k: v for k, v in loaded.params.items() if k != 'prompts'}

  def loss(prompts):
    features = loaded.model.apply({'params': {**frozen, 'prompts': prompts}}, pixels, method=CLIP.encode_image)
    return jnp.sum(features * direction)

  return loss


def test_prompt_gradients_match_torch_and_reach_every_prompt(small_deep, small_torch, photos, highest_precision):
  pixels = _pixels(small_deep, photos)
  direction = np.random.default_rng(0).normal(size=(3, small_deep.spec.projection_dim)).astype(np.float32)
  grads = jax.jit(jax.grad(_image_loss_fn(small_deep, pixels, direction)))(small_deep.params['prompts'])
  grads = np.asarray(grads['tokens'])
  prompts = torch.tensor(np.asarray(small_deep.params['prompts']['tokens']), requires_grad=True)
  features = torch_prompted_image_features(small_torch, torch.tensor(pixels.transpose(0, 3, 1, 2)), prompts)
  (features * torch.tensor(direction)).sum().backward()
  theirs = prompts.grad.numpy()
  np.testing.assert_allclose(grads, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
  per_token = np.abs(grads).max(axis=-1)  # (layers, n): every prompt vector of every layer gets a gradient
  assert np.all(per_token > 1e-6 * np.abs(grads).max()), per_token


def _matmul_output_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Sorted output shapes of every dot_general / convolution in a jaxpr, nested jaxprs (jit, remat, ...) included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      shapes.extend(tuple(sorted(v.aval.shape)) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes.extend(_matmul_output_shapes(sub.jaxpr))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes.extend(_matmul_output_shapes(sub))
  return shapes


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_grad_wrt_prompts_computes_no_backbone_weight_gradients(remat, small_folder, photos):
  loaded = hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', remat=remat)
  pixels = _pixels(loaded, photos)
  direction = np.ones((3, loaded.spec.projection_dim), np.float32)
  # Weight matrices of the image path, compared up to axis order (a weight gradient may come out transposed), one
  # layer at a time: inside the layer scan a weight gradient is one layer's matrix.
  # The position embedding is added, never multiplied, so no matmul could produce its gradient anyway.
  image_path = unstack_layers(
    {'vision': loaded.params['vision'], 'visual_projection': loaded.params['visual_projection']}
  )
  frozen_matrices = {tuple(sorted(p.shape)) for p in jax.tree.leaves(image_path) if p.ndim >= 2}
  frozen_matrices.discard(tuple(sorted(loaded.params['vision']['position_embedding']['embedding'].shape)))

  prompt_grad = jax.grad(_image_loss_fn(loaded, pixels, direction))
  shapes = _matmul_output_shapes(jax.make_jaxpr(prompt_grad)(loaded.params['prompts']).jaxpr)
  assert shapes and not frozen_matrices & set(shapes), frozen_matrices & set(shapes)

  # The same scan does see weight gradients when the backbone is differentiated: the check can fail.
  def full_loss(params):
    features = loaded.model.apply({'params': params}, pixels, method=CLIP.encode_image)
    return jnp.sum(features * direction)

  full_shapes = _matmul_output_shapes(jax.make_jaxpr(jax.grad(full_loss))(loaded.params).jaxpr)
  assert frozen_matrices <= set(full_shapes)

  if remat != 'none':
    return  # the jaxpr scan above is the check under remat; one flop count (below) is enough
  # And XLA's own count: prompt-only backward costs clearly fewer flops than the full backward.
  prompt_flops = jax.jit(prompt_grad).lower(loaded.params['prompts']).compile().cost_analysis()['flops']
  full_flops = jax.jit(jax.grad(full_loss)).lower(loaded.params).compile().cost_analysis()['flops']
  assert prompt_flops < 0.8 * full_flops, (prompt_flops, full_flops)


def _equations(jaxpr, name: str) -> list:
  """Every equation of primitive `name` in a jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found.extend(_equations(sub.jaxpr, name))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found.extend(_equations(sub, name))
  return found


@pytest.mark.parametrize('scan_layers, remat', [(True, 'none'), (True, 'dots'), (False, 'full')])
def test_layers_are_one_scan_with_stacked_parameters(small_folder, photos, scan_layers, remat):
  loaded = hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', remat=remat, scan_layers=scan_layers)
  spec = loaded.spec
  kernel = loaded.params['vision']['layers']['mlp']['fc1']['kernel']
  assert kernel.shape == (spec.vision_layers, spec.vision_width, spec.vision_mlp_dim)
  assert loaded.params['text']['layers']['self_attn']['q_proj']['bias'].shape == (spec.text_layers, spec.text_width)
  pixels = _pixels(loaded, photos)
  jaxpr = jax.make_jaxpr(lambda p: loaded.model.apply({'params': p}, pixels, method=CLIP.encode_image))(
    loaded.params
  ).jaxpr
  scans = _equations(jaxpr, 'scan')
  assert [e.params['length'] for e in scans] == [spec.vision_layers]
  assert scans[0].params['unroll'] == (1 if scan_layers else spec.vision_layers)
  checkpoints = _equations(jaxpr, 'remat2')  # jax.checkpoint's primitive
  assert len(checkpoints) == (0 if remat == 'none' else 1)
  if checkpoints:
    assert checkpoints[0].params['policy'] == (
      jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == 'dots' else None
    )
  ids = jnp.asarray(tokenize(loaded.tokenizer, CAPTIONS))
  text = loaded.model.apply({'params': loaded.params}, ids, method=CLIP.encode_text)
  other = hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', scan_layers=not scan_layers)
  np.testing.assert_allclose(
    other.model.apply({'params': other.params}, ids, method=CLIP.encode_text), text, rtol=1e-5, atol=1e-6
  )


def test_remat_policies_unrolled_layers_and_bfloat16(small_folder, small_deep, photos):
  pixels = _pixels(small_deep, photos)
  direction = np.ones((3, small_deep.spec.projection_dim), np.float32)
  plain_grad = jax.jit(jax.grad(_image_loss_fn(small_deep, pixels, direction)))(small_deep.params['prompts'])
  # Rematerialisation recomputes the same values, and the unrolled loop runs the same layers on the same
  # parameters: the prompt gradients agree with the scanned, non-rematerialised ones (which the twin checks above).
  for kwargs in (
    dict(remat='full'),
    dict(remat='dots'),
    dict(remat=True),
    dict(scan_layers=False),
    dict(scan_layers=False, remat='dots'),
  ):
    other = hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', seed=3, **kwargs)
    other_grad = jax.jit(jax.grad(_image_loss_fn(other, pixels, direction)))(other.params['prompts'])
    np.testing.assert_allclose(other_grad['tokens'], plain_grad['tokens'], rtol=1e-5, atol=1e-6, err_msg=kwargs)

  bf16 = hf_clip.load_transformers_clip(small_folder, prompt_mode='deep', seed=3, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.params))
  ours, reference = _encode_image(bf16, pixels), _encode_image(small_deep, pixels)
  assert ours.dtype == jnp.float32
  cosine = np.sum(ours * reference, -1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
  assert float(cosine.min()) > 0.99


# --- loading errors -------------------------------------------------------------------------------------------------


def _copy_folder(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_missing_folder(tmp_path):
  with pytest.raises(CLIPLoadError, match='does not exist'):
    hf_clip.load_transformers_clip(tmp_path / 'nowhere')


def test_hub_name_is_refused_without_download():
  with pytest.raises(CLIPLoadError, match='Nothing is downloaded.*local folder'):
    hf_clip.load_transformers_clip('openai/clip-vit-base-patch16')


def test_folder_without_weights(small_folder, tmp_path):
  folder = _copy_folder(small_folder, tmp_path / 'clip')
  (folder / 'model.safetensors').unlink()
  with pytest.raises(CLIPLoadError, match='no weights.*model.safetensors'):
    hf_clip.load_transformers_clip(folder)


def test_not_a_clip_config(small_folder, tmp_path):
  folder = _copy_folder(small_folder, tmp_path / 'clip')
  (folder / 'config.json').write_text(json.dumps({'model_type': 'bert', 'hidden_size': 64}))
  with pytest.raises(CLIPLoadError, match='model_type \'bert\'.*expected "clip"'):
    hf_clip.load_transformers_clip(folder)
  (folder / 'config.json').unlink()
  with pytest.raises(CLIPLoadError, match='config.json is missing'):
    hf_clip.load_transformers_clip(folder)


def test_missing_and_misshaped_tensors(small_folder, tmp_path):
  folder = _copy_folder(small_folder, tmp_path / 'clip')
  weights = load_file(folder / 'model.safetensors')
  key = 'vision_model.encoder.layers.1.mlp.fc1.weight'
  assert weights[key].shape == (256, 64)
  save_file({**weights, key: np.zeros((256, 60), np.float32)}, folder / 'model.safetensors')
  with pytest.raises(
    CLIPLoadError,
    match=r"'vision_model.encoder.layers.1.mlp.fc1.weight' has shape "
    r'\(256, 60\), expected \(256, 64\)',
  ):
    hf_clip.load_transformers_clip(folder)
  del weights['text_model.final_layer_norm.bias']
  save_file(weights, folder / 'model.safetensors')
  with pytest.raises(
    CLIPLoadError,
    match=r"missing tensor 'text_model.final_layer_norm.bias' "
    r'\(expected shape \(48,\)\)',
  ):
    hf_clip.load_transformers_clip(folder)


def test_sharded_safetensors_and_pytorch_bin_load_the_same_weights(small_folder, small_plain, small_torch, tmp_path):
  sharded = _copy_folder(small_folder, tmp_path / 'sharded')
  (sharded / 'model.safetensors').unlink()
  small_torch.save_pretrained(str(sharded), max_shard_size='2MB')
  assert (sharded / 'model.safetensors.index.json').is_file() and len(list(sharded.glob('*.safetensors'))) > 1
  pickled = _copy_folder(small_folder, tmp_path / 'pickled')
  (pickled / 'model.safetensors').unlink()
  torch.save(small_torch.state_dict(), pickled / 'pytorch_model.bin')
  for folder in (sharded, pickled):
    params = hf_clip.load_transformers_clip(folder, prompt_mode='none').params
    jax.tree.map(np.testing.assert_array_equal, params, small_plain.params)
