"""SLIP (the paper's backbone) as the frozen CLIP, against a PyTorch reference built from timm and SLIP's own layout.

Files are written in SLIP's format (`torch.save` of {'state_dict': 'module.'-prefixed tensors, 'args': Namespace,
...}) with random weights in SLIP's names, loaded strictly into the reference (tests/slip_reference.py: timm's
VisionTransformer + OpenAI's text tower), and through the project's public loader. Float32 on both sides; the
tolerance, 1e-5 on embeddings of norm ~1, is what two float32 implementations of 2 to 12 layers agree to.
"""

import argparse
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax import evaluate, predict, trained
from cg3d_jax.clip import slip
from cg3d_jax.clip.loaded_clip import CLIPLoadError, load_clip, tokenize
from cg3d_jax.errors import InputError
from cg3d_jax.export import main as export_main
from cg3d_jax.models.clip import CLIP
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.synthetic import random_clip
from cg3d_jax.training import pretrain
from cg3d_jax.weights import cg3d_pth, torch_io
from tests import slip_reference
from tests.conftest import modelnet_root, point_features, run_command, tiny_config

SMALL = dict(
  vision_width=128, vision_layers=2, patch_size=16, image_size=32, text_width=128, text_layers=2, embed_dim=32
)
TOL = 1e-5


def reference_model(state_dict, sizes):
  heads = slip.VISION_HEADS.get(sizes['vision_width'], sizes['vision_width'] // 64)
  model = slip_reference.SLIPCLIP(vision_heads=heads, **sizes).eval()
  model.load_state_dict(state_dict, strict=True)  # the random file's names are SLIP's own
  return model


@pytest.fixture(scope='module')
def small_slip(tmp_path_factory):
  path = tmp_path_factory.mktemp('slip') / 'slip_small.pt'
  state = random_clip.slip_state_dict(seed=1, **SMALL)
  random_clip.write_slip_checkpoint(path, state, model='SLIP_VITB16')
  return path, reference_model(state, SMALL)


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _compare_towers(loaded, reference, image_size, texts):
  pixels = _images(2, image_size)
  ids = tokenize(loaded.tokenizer, texts)
  ours_image = np.asarray(loaded.model.apply({'params': loaded.params}, pixels, method=CLIP.encode_image))
  ours_text = np.asarray(loaded.model.apply({'params': loaded.params}, ids, method=CLIP.encode_text))
  with torch.no_grad():
    ref_image = reference.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    ref_text = reference.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy()
  for ours, ref in ((ours_image, ref_image), (ours_text, ref_text)):
    assert np.abs(ref).max() > 0.1  # not a vacuous comparison
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_small_slip_matches_the_reference(small_slip):
  path, reference = small_slip
  loaded = load_clip(path, prompt_mode='none')
  assert loaded.kind == 'slip' and not loaded.spec.vision_pre_norm and loaded.spec.patch_bias
  assert (loaded.spec.vision_activation, loaded.spec.vision_layer_norm_eps) == ('gelu', 1e-6)
  assert (loaded.spec.text_activation, loaded.spec.text_layer_norm_eps) == ('quick_gelu', 1e-5)
  assert 'pre_layernorm' not in loaded.params['vision']  # absent, not neutral
  np.testing.assert_allclose(float(loaded.params['logit_scale']), float(reference.logit_scale.detach()), rtol=1e-7)
  _compare_towers(loaded, reference, SMALL['image_size'], ['This is a chair', 'a photo of an owl', 'x'])


@pytest.mark.parametrize('mode', ['deep', 'shallow'])
def test_prompted_tower_matches_vpt_deep_reference(small_slip, mode):
  path, reference = small_slip
  loaded = load_clip(path, prompt_mode=mode, num_prompts=3, seed=5)
  tokens = np.array(loaded.params['prompts']['tokens'])
  assert tokens.shape == ((2 if mode == 'deep' else 1), 3, 128)
  pixels = _images(2, SMALL['image_size'], seed=1)
  ours = np.asarray(loaded.model.apply({'params': loaded.params}, pixels, method=CLIP.encode_image))
  with torch.no_grad():
    cls = slip_reference.prompted_class_token(
      reference.visual,
      torch.from_numpy(pixels).permute(0, 3, 1, 2),
      torch.from_numpy(tokens[:1]),
      torch.from_numpy(tokens[1:]) if mode == 'deep' else None,
    )
    ref = (cls @ reference.image_projection).numpy()
    plain = reference.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
  assert np.abs(ref - plain).max() > 1e-2  # the prompts change the answer
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_real_vit_b16_shapes_match_the_reference(tmp_path):
  """SLIP ViT-B/16 exactly as slip_base_100ep.pt is shaped (768 wide, 12 blocks, 12 heads, 224 px; text 512 wide,
  8 heads, vocabulary 49,408, context 77), random weights."""
  sizes = dict(random_clip.SLIP_VIT_B16)
  sizes.pop('vision_heads')
  state = random_clip.slip_state_dict(seed=2, **sizes)
  path = random_clip.write_slip_checkpoint(tmp_path / 'slip_base_100ep.pt', state)
  loaded = load_clip(path, prompt_mode='none')
  spec = loaded.spec
  assert (spec.vision_width, spec.vision_layers, spec.vision_heads, spec.image_size, spec.patch_size) == (
    768,
    12,
    12,
    224,
    16,
  )
  assert (
    spec.text_width,
    spec.text_layers,
    spec.text_heads,
    spec.vocab_size,
    spec.max_positions,
    spec.projection_dim,
  ) == (512, 12, 8, 49408, 77, 512)
  reference = reference_model(state, sizes)
  del state
  _compare_towers(loaded, reference, 224, ['This is a airplane', 'This is a flower_pot'])


def test_tokens_are_framed_as_slip_frames_them(caplog):
  tokenizer = slip.SLIPTokenizer()
  ids = tokenizer.token_ids(['This is a chair'])
  # The BPE vocabulary's own ids: <|startoftext|> 49406, 'this</w>' 589, 'is</w>' 533, 'a</w>' 320,
  # 'chair</w>' 4269, <|endoftext|> 49407; then zeros (SLIP pads with 0, not with <|endoftext|>).
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  assert ids[0, :6].tolist() == [49406, 589, 533, 320, 4269, 49407] and not ids[0, 6:].any()
  long = ' '.join(['chair'] * 100)
  with caplog.at_level('WARNING'):
    cut = tokenizer.token_ids([long])
  assert cut[0].tolist() == [49406] + [4269] * 76  # SLIP's tokens[:77]: the end-of-text token is cut away
  assert 'longer than the 77-token context' in caplog.text


def test_image_preprocessing_matches_torchvision():
  """SLIP's val transform: Resize(224) bilinear, CenterCrop(224), ToTensor, Normalize(ImageNet), on an odd-sized
  image whose crop offset torchvision rounds."""
  slip_reference._import_timm()  # puts the reference libraries (torchvision's transforms) on sys.path
  from PIL import Image
  from torchvision import transforms as T

  image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (301, 250, 3), dtype=np.uint8))
  expected = (
    T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(slip.IMAGENET_MEAN, slip.IMAGENET_STD)])(
      image
    )
    .permute(1, 2, 0)
    .numpy()
  )
  ours = slip.slip_preprocess()(image)
  assert ours.shape == (224, 224, 3)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


class Evil:
  def __reduce__(self):
    return (print, ('pwned',))


class Args(argparse.Namespace):
  pass


def test_bad_slip_files_are_refused_in_one_line(small_slip, tmp_path):
  path, _ = small_slip
  good = torch.load(path, weights_only=False)  # the test's own file

  def write(name, container):
    out = tmp_path / name
    torch.save(container, out)
    return out

  cases = {
    'evil.pt': ({**good, 'args': Evil()}, 'weights_only'),
    'no_state.pt': ({'model': good['state_dict']}, 'a dict with a "state_dict" entry'),
    'not_slip.pt': ({'state_dict': {'module.weight': torch.zeros(3)}}, 'not a SLIP CLIP checkpoint'),
    'missing.pt': (
      {**good, 'state_dict': {k: v for k, v in good['state_dict'].items() if k != 'module.ln_final.bias'}},
      "missing tensor 'ln_final.bias'",
    ),
    'extra.pt': (
      {**good, 'state_dict': {**good['state_dict'], 'module.visual.head.weight': torch.zeros(2, 2)}},
      'visual.head.weight',
    ),
    'nan.pt': (
      {**good, 'state_dict': {**good['state_dict'], 'module.visual.norm.weight': torch.full((128,), float('nan'))}},
      'NaN',
    ),
  }
  for name, (container, message) in cases.items():
    with pytest.raises(CLIPLoadError, match=message) as err:
      load_clip(write(name, container), prompt_mode='none')
    assert '\n' not in str(err.value), name
  (tmp_path / 'text.pt').write_text('not a checkpoint')
  with pytest.raises(CLIPLoadError, match='text.pt: not a SLIP checkpoint: the file is text'):
    load_clip(tmp_path / 'text.pt')


# ---------------------------------------------------------------------------------------------------------------
# Original CG3D checkpoints with their SLIP, through the public commands.

# An original .pth records no head count or grouping: the loader takes CG3D's (6 heads, 64 groups of 32 points).
TINY_PT = dict(width=48, depth=2, num_heads=6, encoder_dim=32, embed_dim=32, num_classes=55)


@pytest.fixture(scope='module')
def original_pair(small_slip, tmp_path_factory):
  """A CG3D-format .pth as the original saves it (point encoder in `base_model`; SLIP's frozen image tower and deep
  prompts in `visual_clip_model`; no config) beside its SLIP file."""
  slip_path, _ = small_slip
  encoder = PointTransformer(**TINY_PT)
  variables = encoder.init(jax.random.key(0), jnp.zeros((1, 64, 3)), train=False)
  prompts = np.random.default_rng(4).uniform(-0.1, 0.1, (2, 3, 128)).astype(np.float32)
  container = {
    'base_model': torch_io.point_transformer_to_torch(variables['params'], variables['batch_stats']),
    'visual_clip_model': {
      **{k: torch.from_numpy(v) for k, v in slip.visual_tensors(slip_path).items()},
      **cg3d_pth.prompts_to_torch(prompts, 'deep'),
    },
    'epoch': 99,
    'metrics': {},
    'best_metrics': {},
  }
  pth = tmp_path_factory.mktemp('original') / 'cg3d_pointbert.pth'
  torch.save(container, pth)
  return pth, slip_path, prompts


def test_original_pth_predicts_with_its_slip(original_pair, small_slip, tmp_path, capsys):
  pth, slip_path, prompts = original_pair
  owl = pathlib.Path(__file__).parent / 'fixtures' / 'openshape_owl' / 'owl.ply'
  labels = ['owl', 'chair', 'airplane']
  code = run_command(
    predict.main,
    [
      '--checkpoint',
      str(pth),
      '--clip_path',
      str(slip_path),
      '--points',
      str(owl),
      '--labels',
      ','.join(labels),
      '--num_points',
      '64',
      '--json',
      str(tmp_path / 'p.json'),
    ],
  )
  assert code == 0, capsys.readouterr().err
  result = json.loads((tmp_path / 'p.json').read_text())
  # The text side, recomputed by the reference SLIP: "This is a {label}", L2-normalised, cosine with the point
  # features the command reports.
  _, reference = small_slip
  tokenizer = slip.SLIPTokenizer()
  with torch.no_grad():
    text = reference.encode_text(
      torch.from_numpy(tokenizer.token_ids([f'This is a {x}' for x in labels]).astype(np.int64))
    ).numpy()
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  model = trained.with_clip(trained.load_trained(pth, num_points=64), str(slip_path))
  np.testing.assert_array_equal(model.clip.params['prompts']['tokens'], prompts)
  from cg3d_jax.data.formats import point_files
  from cg3d_jax.evaluators.prediction import prepare_points

  cloud = prepare_points(point_files.read_points(owl).xyz, 64)
  assert model.model.num_points == 64
  point = point_features(model.model, model.encoder_vars, cloud[None])[0]
  similarity = {row['name']: row['similarity'] for row in result['labels']}
  np.testing.assert_allclose([similarity[x] for x in labels], text @ point, atol=1e-5)


def test_original_pth_evaluates_zero_shot_with_the_original_protocol(
  original_pair, modelnet40_prepared, tmp_path, capsys
):
  pth, slip_path, _ = original_pair
  code = run_command(
    evaluate.main,
    [
      '--config',
      'zeroshot_modelnet40:original',
      '--checkpoint',
      str(pth),
      '--workdir',
      str(tmp_path / 'zs'),
      f'--config.clip.path={slip_path}',
      f'--config.eval.manual_dir={modelnet_root()}',
      f'--config.eval.data_dir={modelnet40_prepared}',
      '--config.eval.skip_bad=true',
      '--config.eval.batch_size=8',
      '--config.model.num_points=64',
      '--config.eval.num_stored_points=256',
    ],
  )
  assert code == 0, capsys.readouterr().err[-3000:]
  results = json.loads((tmp_path / 'zs' / 'results.json').read_text())
  assert results['protocol'] == 'cg3d_original' and results['normalize_text'] is False
  assert results['clip'] == {'kind': 'slip', 'path': str(slip_path)}
  assert results['num_objects'] == 20  # the fixture's 10 test airplanes and 10 bathtubs


def test_original_pth_refuses_another_image_tower(original_pair, tmp_path, tiny_clip_dir):
  pth, slip_path, _ = original_pair
  other = random_clip.write_slip_checkpoint(tmp_path / 'other.pt', random_clip.slip_state_dict(seed=9, **SMALL))
  model = trained.load_trained(pth, num_points=64)
  with pytest.raises(InputError, match='visual_clip_model.cls_token differs from the same tensor'):
    trained.with_clip(model, other)
  with pytest.raises(InputError, match='holds a SLIP image tower'):
    trained.with_clip(model, tiny_clip_dir)


def test_pretraining_on_slip_exports_the_original_visual_clip_model(small_slip, tiny_shapenet, tmp_path, capsys):
  """Two steps of the tiny recipe with SLIP as the frozen CLIP; the export's visual_clip_model is what the original
  saves (timm's frozen tower + the two prompt tensors) and loads strictly into a prompted timm ViT, whose class
  token then equals the JAX image features of the trained run."""
  slip_path, reference = small_slip
  workdir = tmp_path / 'run'
  config = tiny_config(
    str(slip_path), tiny_shapenet, **{'train.total_steps': 2, 'eval.every_steps': 0, 'clip.prompt.num_tokens': 3}
  )
  pretrain.train(config, str(workdir))
  out = tmp_path / 'slip_run.pth'
  assert run_command(export_main, ['--checkpoint', str(workdir), '--out', str(out)]) == 0, capsys.readouterr().err
  visual = torch.load(out, weights_only=True)['visual_clip_model']
  frozen = reference.visual.state_dict()
  assert set(visual) == set(frozen) | {'prompt_embeddings', 'deep_prompt_embeddings'}
  assert len(frozen) == 4 + 12 * SMALL['vision_layers'] + 2  # 150 at ViT-B/16's 12 blocks

  prompted = slip_reference.vision_transformer(width=128, layers=2, heads=2, patch_size=16, image_size=32)
  prompted.prompt_embeddings = torch.nn.Parameter(torch.zeros(1, 3, 128))
  prompted.deep_prompt_embeddings = torch.nn.Parameter(torch.zeros(1, 3, 128))
  prompted.load_state_dict(visual, strict=True)
  for key, value in frozen.items():
    torch.testing.assert_close(visual[key], value, rtol=0, atol=0)  # the SLIP file's own values
  model = trained.with_clip(trained.load_trained(workdir))
  tokens = np.asarray(model.clip.params['prompts']['tokens'])
  np.testing.assert_array_equal(visual['prompt_embeddings'].numpy(), tokens[:1])
  pixels = _images(2, 32, seed=7)
  with torch.no_grad():
    cls = slip_reference.prompted_class_token(
      prompted.eval(),
      torch.from_numpy(pixels).permute(0, 3, 1, 2),
      prompted.prompt_embeddings,
      prompted.deep_prompt_embeddings,
    )
  ours = model.clip.model.apply({'params': model.clip_params}, pixels, method=CLIP.encode_image)
  np.testing.assert_allclose(np.asarray(ours), (cls @ reference.image_projection).detach().numpy(), atol=TOL, rtol=0)


def test_slip_args_namespace_is_the_only_object_allowed(small_slip):
  """The loader rebuilds argparse.Namespace (SLIP saves its args) and nothing else: a Namespace subclass is refused."""
  path, _ = small_slip
  container = torch.load(path, weights_only=False)
  buffer = io.BytesIO()
  torch.save({**container, 'args': Args(model='SLIP_VITB16')}, buffer)
  bad = pathlib.Path(str(path) + '.sub.pt')
  bad.write_bytes(buffer.getvalue())
  with pytest.raises(CLIPLoadError, match='weights_only'):
    slip.read_slip_file(bad)
  _, args = slip.read_slip_file(path)
  assert isinstance(args, argparse.Namespace) and args.model == 'SLIP_VITB16'


def test_demo_assets_can_write_a_random_slip(tmp_path):
  from cg3d_jax.configs import demo
  from cg3d_jax.errors import ConfigError
  from cg3d_jax.synthetic import demo_inputs
  from cg3d_jax.training import config_checks

  config = demo.get_config()
  config.demo.clip_kind = 'slip'
  config.demo.synthetic.update(dict(num_train_per_class=1, num_test_per_class=1, num_points=64, image_size=32))
  assets = demo_inputs.write(tmp_path / 'assets', config.demo)
  assert assets.clip_path.endswith('slip.pt')
  loaded = load_clip(assets.clip_path, prompt_mode='deep', num_prompts=5)
  assert loaded.kind == 'slip' and loaded.spec.projection_dim == config.model.embed_dim
  assert (loaded.spec.vision_width, loaded.spec.image_size) == (
    config.demo.clip.vision_width,
    config.demo.clip.image_size,
  )
  config.demo.clip.vision_width = 96
  with pytest.raises(ConfigError, match=r"vision_width=96 is not divisible by 64 \(a SLIP tower's heads"):
    config_checks.check_demo(config)


class _Shape:
  """A tensor stand-in carrying only a shape: sizing reads shapes, and ViT-L/16 at full size is 1.2 GB."""

  def __init__(self, *shape):
    self.shape = shape


@pytest.mark.parametrize(
  'model,width,layers,heads',
  [('SLIP_VITS16', 384, 12, 12), ('SLIP_VITB16', 768, 12, 12), ('SLIP_VITL16', 1024, 24, 16)],
)
def test_slip_s_b_l_sizes_come_from_the_shapes(model, width, layers, heads):
  """SLIP's three image towers (models.py: vit_small_mocov3 384 x 12 with 12 heads, vit_base 768 x 12 with 12,
  vit_large 1024 x 24 with 16), each with OpenAI's 512-wide, 8-head text tower."""
  state = {
    'visual.pos_embed': _Shape(1, 197, width),
    'visual.patch_embed.proj.weight': _Shape(width, 3, 16, 16),
    'token_embedding.weight': _Shape(49408, 512),
    'positional_embedding': _Shape(77, 512),
    'image_projection': _Shape(width, 512),
    'visual.blocks.0.mlp.fc1.weight': _Shape(4 * width, width),
    'transformer.resblocks.0.mlp.c_fc.weight': _Shape(2048, 512),
  }
  state.update({f'visual.blocks.{i}.norm1.weight': _Shape(width) for i in range(layers)})
  state.update({f'transformer.resblocks.{i}.ln_1.weight': _Shape(512) for i in range(12)})
  spec = slip.spec_from_state_dict('f.pt', state, argparse.Namespace(model=model))
  assert (spec.vision_width, spec.vision_layers, spec.vision_heads, spec.image_size) == (width, layers, heads, 224)
  assert (spec.text_width, spec.text_layers, spec.text_heads, spec.projection_dim) == (512, 12, 8, 512)
  other = 'SLIP_VITB16' if model == 'SLIP_VITS16' else 'SLIP_VITS16'
  with pytest.raises(CLIPLoadError, match=f'args.model is {other} but the image tower is {width} wide'):
    slip.spec_from_state_dict('f.pt', state, argparse.Namespace(model=other))


def test_original_pth_retrieves_with_its_slip(original_pair, small_slip, tiny_shapenet, tmp_path, capsys):
  """`evaluate --config retrieval_shapenet55` with a CG3D .pth and its SLIP file: the command ranks, and the text
  queries it ranks with are the reference SLIP's ("This is a {class}", L2-normalised)."""
  from cg3d_jax import sharding
  from cg3d_jax.configs import retrieval_shapenet55
  from cg3d_jax.data import builders
  from cg3d_jax.evaluators import retrieval

  pth, slip_path, _ = original_pair
  manual, data_dir = tiny_shapenet
  code = run_command(
    evaluate.main,
    [
      '--config',
      'retrieval_shapenet55',
      '--checkpoint',
      str(pth),
      '--workdir',
      str(tmp_path / 'ret'),
      f'--config.clip.path={slip_path}',
      f'--config.eval.data_dir={data_dir}',
      f'--config.eval.manual_dir={manual}',
      '--config.eval.num_stored_points=256',
      '--config.eval.batch_size=16',
      '--config.model.num_points=64',
    ],
  )
  assert code == 0, capsys.readouterr().err[-3000:]
  saved = json.loads((tmp_path / 'ret' / retrieval.RESULTS_FILE).read_text())
  assert saved['text_to_3d']['num_queries'] == 13 and saved['image_to_3d']['num_queries'] == 26
  assert all(0 <= saved[d]['recall@1'] <= saved[d]['recall@10'] <= 1 for d in retrieval.DIRECTIONS)

  model = trained.with_clip(trained.load_trained(pth, num_points=64), str(slip_path))
  names = builders.class_names(builders.get_builder('shapenet55_cg3d', data_dir=data_dir))
  config = retrieval_shapenet55.get_config()
  evaluator = retrieval.RetrievalEvaluator(
    model.model,
    model.clip_params,
    model.clip.tokenizer,
    batches=None,
    class_names=names,
    mesh=sharding.make_mesh({'data': -1, 'fsdp': 1}),
    templates=config.eval.templates,
  )
  _, reference = small_slip
  with torch.no_grad():
    text = reference.encode_text(
      torch.from_numpy(slip.SLIPTokenizer().token_ids([f'This is a {x}' for x in names]).astype(np.int64))
    ).numpy()
  assert config.eval.templates == 'cg3d_zeroshot'
  np.testing.assert_allclose(evaluator.text_features, text / np.linalg.norm(text, axis=1, keepdims=True), atol=1e-5)


def test_original_pth_queries_a_scene_with_its_slip(original_pair, tmp_path, capsys):
  """`query_scene` end to end with a CG3D .pth and its SLIP file, on the owl cloud as a one-object scene."""
  from cg3d_jax import query_scene

  pth, slip_path, _ = original_pair
  owl = pathlib.Path(__file__).parent / 'fixtures' / 'openshape_owl' / 'owl.ply'
  out = tmp_path / 'out'
  code = run_command(
    query_scene.main,
    [
      '--checkpoint',
      str(pth),
      '--clip_path',
      str(slip_path),
      '--scene',
      str(owl),
      '--queries',
      'owl,chair',
      '--num_points',
      '64',
      '--radius',
      '0.5',
      '--out',
      str(out),
    ],
  )
  assert code == 0, capsys.readouterr().err[-3000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['queries'] == ['owl', 'chair'] and summary['scene_points'] == 10000
  scores = np.load(out / 'point_scores.npy')
  assert scores.shape == (10000, 2) and ((scores >= 0) & (scores <= 1)).all()
