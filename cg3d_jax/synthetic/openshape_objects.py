"""Procedural objects written in OpenShape's exact layout (data/openshape.py), for tests and offline demos.

Each shape family of synthetic/shapes.py is a class ("sphere", "torus", ...); each object is one pickled-dict `.npy`
written with `np.save(path, dict)` as OpenShape writes them, y-up like OpenShape's files, with a colour per class.
Features stand in for a CLIP's: every class has a random unit direction in a `feature_dim`-wide space; an object's
views, thumbnail, texts and captions are that direction plus noise, so a point encoder trained against them can
learn the classes, and the class-name feature table (`lvis_cat_name_pt_feat.npy`, classes in sorted order as
OpenShape's evaluation reads them) scores zero-shot.

  root/meta_data/split/{train_all,train_no_lvis,lvis}.json, root/meta_data/split/ablation/train_shapenet_only.json,
  root/meta_data/gpt4_filtering.json,
  root/meta_data/lvis_cat_name_pt_feat.npy, root/data/<dataset>/<uid>.npy
  root/lvis_testset.txt                       Uni3D's list of the same LVIS-style shapes (cate_id,cate_name,uid,path)
  root/meta_data/modelnet40/{test_pc.npy, test_split.json, cat_name_pt_feat.npy}
  root/meta_data/scanobjectnn/{xyz_label.npy, cat_name_pt_feat.npy}
                                              OpenShape's ModelNet40 / ScanObjectNN files, over the same classes
                                              (ScanObjectNN's 15 names; the first len(classes) carry the shapes)
"""

import json
import pathlib

import numpy as np
from PIL import Image

from cg3d_jax.clip.templates import get_templates
from cg3d_jax.data.host_transforms import normalize_unit_sphere_np
from cg3d_jax.data.openshape import RENDER_VIEWS
from cg3d_jax.data.openshape_eval import SCANOBJECTNN_CLASSES
from cg3d_jax.synthetic.render import orbit_views
from cg3d_jax.synthetic.shapes import FAMILIES, sample_surface


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _text_feature(direction, rng, noise):
  return {
    'original': _unit(direction + noise * rng.standard_normal(direction.shape)).astype(np.float32),
    'prompt_avg': _unit(direction + noise * rng.standard_normal(direction.shape)).astype(np.float32),
  }


class ClipFeatures:
  """Features as OpenShape computes them, from a transformers CLIP folder through transformers' own PyTorch model
  (so that a test compares the package's CLIP and prompt averaging with an outside computation): raw projected
  text and image features; 'prompt_avg' of a name = the normalised mean of its normalised features over the 64
  `ulip` templates."""

  def __init__(self, folder):
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    self._torch = torch
    self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    self.dim = int(self.model.config.projection_dim)
    self._prompt_avg = {}

  def _out(self, out) -> np.ndarray:
    return getattr(out, 'pooler_output', out).numpy().astype(np.float32)

  def text(self, texts) -> np.ndarray:
    with self._torch.no_grad():
      return self._out(self.model.get_text_features(**self.tokenizer(list(texts), padding=True, return_tensors='pt')))

  def prompt_avg(self, name: str) -> np.ndarray:
    if name not in self._prompt_avg:  # asked for by every shape of a class and by the class tables
      unit = _unit(self.text([t.format(name) for t in get_templates(PROMPT_TEMPLATES)]).astype(np.float64))
      self._prompt_avg[name] = _unit(unit.mean(axis=0)).astype(np.float32)
    return self._prompt_avg[name]

  def images(self, images) -> np.ndarray:
    with self._torch.no_grad():
      return self._out(self.model.get_image_features(**self.processor(images=list(images), return_tensors='pt')))


PROMPT_TEMPLATES = 'ulip'  # what ClipFeatures averages names over (the eval's `templates` prompt set, by default)


def _clip_features(clip: ClipFeatures, data: dict, name: str, views: list) -> dict:
  """The feature fields of one shape's dict from the CLIP: views -> image_feat (thumbnail: the first view)."""

  def text_pair(text):
    feature = clip.text([text])[0]
    return {'original': feature, 'prompt_avg': feature}

  out = {
    'image_feat': clip.images(views),
    'text_feat': [{'original': clip.text([t])[0], 'prompt_avg': clip.prompt_avg(name)} for t in data['text']],
    'blip_caption_feat': text_pair(data['blip_caption']),
    'msft_caption_feat': text_pair(data['msft_caption'] or name),
    'retrieval_text_feat': [{'original': clip.text([t])[0]} for t in data['retrieval_text']],
  }
  if 'thumbnail_feat' in data:
    out['thumbnail_feat'] = out['image_feat'][0]
  return out


def write_openshape_layout(
  root,
  *,
  classes=('sphere', 'box', 'cylinder', 'torus', 'cone', 'table'),
  train_per_class: int = 6,
  lvis_per_class: int = 3,
  num_points: int = 2048,
  feature_dim: int = 32,
  views: int = 12,
  noise: float = 0.3,
  seed: int = 0,
  render_size: int = 0,
  clip_folder=None,
) -> pathlib.Path:
  """Writes the layout under `root` and returns it. Training objects alternate between Objaverse and ShapeNet
  entries (the two target-sampling rules); the LVIS-style evaluation set is Objaverse objects of every class.
  render_size > 0 also writes OpenShape's raw renders, rendered_images/<uid>/colors_{0..11}.png of that size.
  clip_folder (a transformers CLIP folder; needs render_size): every feature is that CLIP's (ClipFeatures), as
  OpenShape's are OpenCLIP's: views and thumbnail from the renders, texts and captions as written, names and the
  class tables averaged over the `ulip` templates; otherwise class directions plus noise stand in for them."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  clip = None
  if clip_folder is not None:
    if not render_size:
      raise ValueError('write_openshape_layout: clip_folder needs render_size > 0 (image features come from renders)')
    clip = ClipFeatures(clip_folder)
    feature_dim = clip.dim
  directions = _unit(rng.standard_normal((len(classes), feature_dim)))
  colours = rng.uniform(0.1, 0.9, (len(classes), 3))
  split, lvis, flags = [], [], {}
  for c, name in enumerate(classes):
    for i in range(train_per_class + lvis_per_class):
      evaluation = i >= train_per_class
      dataset = 'Objaverse' if evaluation or i % 2 == 0 else 'ShapeNet'
      uid = f'{name}_{i:03d}'
      xyz, normals = sample_surface(rng, FAMILIES[name](rng), num_points)
      xyz = normalize_unit_sphere_np(xyz)[:, [0, 2, 1]]  # stored y-up, as OpenShape's files
      renders = []
      if render_size:  # the renderer orbits the y axis: the stored y-up object stands upright
        folder = root / 'rendered_images' / uid
        folder.mkdir(parents=True, exist_ok=True)
        renders = orbit_views(
          xyz, normals[:, [0, 2, 1]], colours[c] * 255, num_views=RENDER_VIEWS, image_size=render_size
        )
        for k, view in enumerate(renders):
          Image.fromarray(view).save(folder / f'colors_{k}.png')
      rgb = np.clip(colours[c] + 0.05 * rng.standard_normal((num_points, 3)), 0, 1)
      direction = directions[c]
      data = {
        'xyz': xyz.astype(np.float32),
        'rgb': rgb.astype(np.float32),
        'image_feat': _unit(direction + noise * rng.standard_normal((views, feature_dim))).astype(np.float32),
        'text': [f'a {name}'],
        'text_feat': [_text_feature(direction, rng, noise)],
        'blip_caption': f'a 3d model of a {name}',
        'blip_caption_feat': _text_feature(direction, rng, noise),
        'msft_caption': '' if i % 3 == 0 else f'a {name} shape',
        'msft_caption_feat': _text_feature(direction, rng, noise),
        'retrieval_text': [f'{name} object', f'{name}'],
        'retrieval_text_feat': [_text_feature(direction, rng, noise) for _ in range(2)],
      }
      if dataset == 'Objaverse':
        data['thumbnail_feat'] = _unit(direction + noise * rng.standard_normal(feature_dim)).astype(np.float32)
      if clip is not None:
        data.update(_clip_features(clip, data, name, renders))
      relative = pathlib.Path('data') / dataset / f'{uid}.npy'
      (root / relative).parent.mkdir(parents=True, exist_ok=True)
      np.save(root / relative, data, allow_pickle=True)
      if evaluation:
        lvis.append({'uid': uid, 'category': name, 'group': 'synthetic', 'data_path': str(relative)})
      else:
        split.append({'id': uid, 'dataset': dataset, 'group': 'synthetic', 'data_path': str(relative)})
        if dataset == 'Objaverse':
          flags[uid] = {'flag': 'N' if i % 4 == 0 else 'Y', 'name': name}
  meta = root / 'meta_data'
  (meta / 'split').mkdir(parents=True, exist_ok=True)
  (meta / 'split' / 'train_all.json').write_text(json.dumps(split, indent=1))
  # OpenShape's other training splits: without the LVIS shapes (here the LVIS-style objects are never training
  # objects, so the same entries), and ShapeNet's alone (its ablation).
  (meta / 'split' / 'train_no_lvis.json').write_text(json.dumps(split, indent=1))
  (meta / 'split' / 'ablation').mkdir(exist_ok=True)
  (meta / 'split' / 'ablation' / 'train_shapenet_only.json').write_text(
    json.dumps([entry for entry in split if entry['dataset'] == 'ShapeNet'], indent=1)
  )
  (meta / 'split' / 'lvis.json').write_text(json.dumps(lvis, indent=1))
  (meta / 'gpt4_filtering.json').write_text(json.dumps(flags, indent=1))
  if clip is not None:  # the class tables are the CLIP's too
    directions = np.stack([clip.prompt_avg(name) for name in classes])
  order = np.argsort(np.array(classes))  # OpenShape's categories are sorted names
  np.save(meta / 'lvis_cat_name_pt_feat.npy', directions[order].astype(np.float32))
  # Uni3D lists the same shapes with ids in its own (here: the writer's) class order; paths begin with '/'.
  (root / 'lvis_testset.txt').write_text(
    ''.join(f'{classes.index(e["category"])},{e["category"]},{e["uid"]},/{e["data_path"]}\n' for e in lvis)
  )
  _write_test_sets(root, classes, directions, colours, rng, num_points, clip)
  return root


def _write_test_sets(root: pathlib.Path, classes, directions, colours, rng, num_points: int, clip=None) -> None:
  """OpenShape's ModelNet40 and ScanObjectNN evaluation files: two clouds per class, stored y-up."""
  folder = root / 'meta_data' / 'modelnet40'
  folder.mkdir(parents=True, exist_ok=True)
  clouds, split = [], []
  for c, name in enumerate(classes):
    for i in range(2):
      xyz, _ = sample_surface(rng, FAMILIES[name](rng), num_points)
      clouds.append(
        {'xyz': normalize_unit_sphere_np(xyz)[:, [0, 2, 1]], 'rgb': np.full((num_points, 3), 102.0, np.float32)}
      )  # OpenShape's ~0.4 grey, stored 0-255
      split.append({'name': f'{name}_{i:04d}', 'category': name})
  holder = np.empty(len(clouds), dtype=object)
  holder[:] = clouds
  np.save(folder / 'test_pc.npy', holder, allow_pickle=True)
  (folder / 'test_split.json').write_text(json.dumps(split, indent=1))
  # The feature dict's key order is the class order (reversed here, so that a reader that sorts would be wrong).
  np.save(
    folder / 'cat_name_pt_feat.npy',
    {
      name: {'open_clip_text_feat': directions[c][None].astype(np.float32)}
      for c, name in reversed(list(enumerate(classes)))
    },
    allow_pickle=True,
  )

  folder = root / 'meta_data' / 'scanobjectnn'
  folder.mkdir(parents=True, exist_ok=True)
  names = SCANOBJECTNN_CLASSES
  xyz, labels = [], []
  for c, name in enumerate(classes[: len(names)]):
    for _ in range(2):
      points, _ = sample_surface(rng, FAMILIES[name](rng), num_points)
      xyz.append(normalize_unit_sphere_np(points)[:, [0, 2, 1]])
      labels.append(c)
  np.save(
    folder / 'xyz_label.npy', {'xyz': np.stack(xyz).astype(np.float32), 'label': np.array(labels)}, allow_pickle=True
  )
  extra = (
    np.stack([clip.prompt_avg(name) for name in names])
    if clip is not None
    else _unit(rng.standard_normal((len(names), directions.shape[1])))
  )
  features = {
    name: {'open_clip_text_feat': (directions[c] if c < len(classes) else extra[c])[None].astype(np.float32)}
    for c, name in enumerate(names)
  }
  np.save(folder / 'cat_name_pt_feat.npy', features, allow_pickle=True)
