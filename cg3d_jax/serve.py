"""A local web page to classify and search shapes: `python -m cg3d_jax.serve --checkpoint CKPT [--library DIR]`.

  python -m cg3d_jax.serve --checkpoint /tmp/cg3d_demo/pretrain --library /tmp/cg3d_demo/library
  # then open http://127.0.0.1:7860

  Classify  upload a cloud (.ply .npy .off .txt .xyz .csv), type labels or pick a preset (ModelNet40, ShapeNet-55,
            Objaverse-LVIS), see the cloud in an interactive 3D view and its top 5 with probabilities
            (cg3d_jax/evaluators/prediction);
  Search    a text, an image or a cloud over the library cg3d-embed wrote (the same encoder), k and a minimum
            similarity, a gallery of thumbnails; choosing one shows that shape in 3D with its file name
            (cg3d_jax/shape_library.py);
  Scene     a scene file and text queries: the per-point relevance in 3D with a colour bar, presence answers, and
            the scene commands' output files to download (cg3d_jax/scenes/).

The page shows which checkpoint and CLIP it scores with. A bad upload or setting gets the one-line message the
commands give, on the page, and the server keeps answering. Bound to 127.0.0.1 unless --host says otherwise; nothing
is fetched from the network (Gradio's analytics are off).
"""

import os
import pathlib

from absl import flags

from cg3d_jax import cli
from cg3d_jax.errors import InputError

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
LIBRARY_DIR = cli.library_flag()
CLASS_FEATURES = cli.class_features_flag()
TEMPLATES = cli.templates_flag()
HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address the page is served on (127.0.0.1: this machine only).')
PORT = flags.DEFINE_integer('port', 7860, 'Port of the page.')

_SHARED = ('checkpoint', 'step', 'clip_path', 'num_points', 'library', 'class_features', 'templates')
for _shared in (*_SHARED, 'verbose'):
  flags.declare_key_flag(_shared)

PRESETS = {
  'ModelNet40': 'modelnet40_shape_names.txt',
  'ShapeNet-55': 'shapenet55_shape_names.txt',
  'Objaverse-LVIS': 'objaverse_lvis_names.txt',  # 1,156 categories, one per line (one name holds a space)
}
VIEW_POINTS = 4096  # points drawn in the 3D view (a subset of larger clouds: the browser stays responsive)
TOP = 5


def preset_labels(name: str) -> list[str]:
  from cg3d_jax import assets

  if name not in PRESETS:
    raise InputError(f'preset {name!r}: expected one of {list(PRESETS)}')
  return [line.strip() for line in assets.read_text(PRESETS[name]).splitlines() if line.strip()]


def _scatter(xyz, marker: dict, limit: int, title: str, axes=(0, 1, 2)):
  """A plotly 3D scatter of at most `limit` points (a fixed random subset: the browser stays responsive); `marker`
  holds per-point arrays under 'color' when colours vary, subset alike."""
  import numpy as np
  import plotly.graph_objects as go

  xyz = np.asarray(xyz, np.float32)
  keep = np.random.default_rng(0).permutation(len(xyz))[:limit] if len(xyz) > limit else slice(None)
  colour = marker.get('color')
  marker = dict(marker, color=np.asarray(colour)[keep] if isinstance(colour, np.ndarray) else colour)
  xyz = xyz[keep]
  x, y, z = (xyz[:, a] for a in axes)
  figure = go.Figure(go.Scatter3d(x=x, y=y, z=z, mode='markers', marker=marker))
  figure.update_layout(title=title, margin=dict(l=0, r=0, t=30 if title else 0, b=0), scene=dict(aspectmode='data'))
  return figure


def cloud_figure(xyz, rgb=None, title: str = ''):
  """An interactive 3D view of a shape (y up, as shapes are stored; at most VIEW_POINTS points), in its colours or
  coloured by height."""
  import numpy as np

  if rgb is not None:
    rgb = np.asarray(rgb)
    rgb = rgb if rgb.dtype == np.uint8 else np.clip(rgb * 255.0, 0, 255).astype(np.uint8)
    colour = np.array([f'rgb({r},{g},{b})' for r, g, b in rgb])
    marker = dict(size=2, color=colour)
  else:
    marker = dict(size=2, color=np.asarray(xyz, np.float32)[:, 1], colorscale='Viridis')
  return _scatter(xyz, marker, VIEW_POINTS, title, axes=(0, 2, 1))


def heat_figure(xyz, scores, title: str = ''):
  """A 3D view of a scene (z up) coloured by per-point scores, with a colour bar."""
  import numpy as np

  marker = dict(size=2, color=np.asarray(scores, np.float32), colorscale='Inferno', colorbar=dict(title='relevance'))
  return _scatter(xyz, dict(marker, cmin=0.0), VIEW_POINTS * 4, title)


class Page:
  """What the page scores with, loaded once: the model (with its CLIP, or label features from a file), the library."""

  def __init__(
    self, checkpoint, *, clip_path=None, library=None, class_features=None, templates=None, step=None, num_points=1024
  ):
    from cg3d_jax import trained

    loaded = trained.load_trained(checkpoint, step=step, num_points=num_points)
    self.loaded = loaded
    self.class_features = class_features
    self.scoring = trained.without_clip(loaded) if class_features else trained.with_clip(loaded, clip_path)
    self.templates = templates or self.scoring.config.get('eval', {}).get('templates', 'cg3d_zeroshot')
    self.library = self._checked_library(library) if library else None
    clip = self.scoring.clip
    text = f'label features from {class_features}' if class_features else f'{clip.kind} CLIP at {clip.source}'
    self.model_description = (
      f'**checkpoint** {loaded.source} ({loaded.config.get("family", "CG3D")}, step {loaded.step}, '
      f'{loaded.num_points} points) · **text** {text}'
    )

  @property
  def describe(self) -> str:
    where = f' · **library** {self.library.root} ({len(self.library)} shapes)' if self.library else ''
    return self.model_description + where

  def _checked_library(self, folder):
    from cg3d_jax import shape_library

    library = shape_library.open_library(folder)
    if not library.embedded_by(self.loaded):
      raise InputError(
        f'library {folder} was embedded with {library.encoder["source"]}, not {self.loaded.source}: a library is '
        'searched with the encoder that embedded it'
      )
    return library

  def load_library(self, folder: str):
    """(message, description) after loading the library at `folder` (kept as it was when it cannot be used)."""
    try:
      if not folder or not folder.strip():
        raise InputError('type the folder cg3d-embed wrote')
      self.library = self._checked_library(folder.strip())
    except (InputError, ValueError, OSError) as err:
      return f'error: {err}', self.describe
    return f'{len(self.library)} shapes from {self.library.root}', self.describe

  def classify(self, cloud_path, labels_text: str, preset: str | None):
    """(3D figure, top-5 rows [rank, label, probability], message) for an uploaded cloud."""
    from cg3d_jax.evaluators import prediction

    try:
      if not cloud_path:
        raise InputError('upload a point cloud (.ply .npy .off .txt .xyz .csv) first')
      labels = cli.parse_labels(labels_text) if labels_text and labels_text.strip() else []
      if not labels and preset:
        labels = preset_labels(preset)
      if len(labels) < 2:
        raise InputError('give at least two labels (comma-separated) or pick a preset')
      cloud = prediction.read_checked_cloud(cloud_path)
      classifier = None
      if self.class_features:
        classifier = prediction.label_features(self.class_features, labels, self.scoring.trained.embed_dim)
      templates = [self.templates] if '{}' in self.templates else self.templates
      result = prediction.predict(self.scoring, cloud, labels, templates=templates, classifier=classifier)
    except (InputError, ValueError) as err:  # the one line the commands print, on the page
      return None, [], f'error: {err}'
    rows = [[r['rank'], r['name'], round(r['probability'], 4)] for r in result['labels'][:TOP]]
    name = pathlib.Path(cloud_path).name
    figure = cloud_figure(cloud.xyz, cloud.rgb, f'{name}: {rows[0][1]}')
    return figure, rows, f'{name}: {result["num_points_read"]} points, {len(labels)} labels'

  def search(self, text: str, k, min_score, image=None, cloud=None):
    """(gallery [(thumbnail, caption)], the hits, message) of a text, image or cloud query over the library."""
    from cg3d_jax import shape_library

    try:
      if self.library is None:
        raise InputError('no library loaded: start the page with --library (cg3d-embed writes one)')
      text = text.strip() if text and text.strip() else None
      given = [name for name, value in (('a text', text), ('an image', image), ('a cloud', cloud)) if value]
      if len(given) != 1:
        raise InputError(f'give one query: a text, an image or a cloud (got {", ".join(given) or "none"})')
      k = int(k)
      if k < 1:
        raise InputError(f'k {k}: at least 1')
      query = shape_library.query_vector(
        self.scoring.trained,
        self.library,
        text=text,
        image=image,
        points=cloud,
        templates=self.templates,
        class_features=self.class_features,
        clip_path=self.scoring.clip.source if self.scoring.clip else None,
      )
      hits = shape_library.search(self.library, query, k, None if min_score in (None, '') else float(min_score))
    except (InputError, ValueError) as err:
      return [], [], f'error: {err}'
    # The thumbnails as pixels, not paths: a library anywhere on disk shows without widening what the server reads.
    gallery = [(_pixels(h['thumbnail']), f'{h["file"]} ({h["score"]:.3f})') for h in hits if h['thumbnail']]
    what = repr(text) if text else pathlib.Path(image or cloud).name
    return gallery, hits, f'{len(hits)} of {len(self.library)} shapes for {what}'

  def scene(self, scene_path, queries_text: str):
    """(heat figure of the first query, presence answers (markdown), output files, message) of text queries over a
    scene: the scene commands' regions, scores and files (cg3d_jax/scenes/queries.py, outputs.py)."""
    import tempfile

    from cg3d_jax.evaluators import prediction
    from cg3d_jax.scenes import outputs, s3dis
    from cg3d_jax.scenes import queries as scene_queries

    try:
      if not scene_path:
        raise InputError('upload a scene (.ply .npy .off .txt, or an S3DIS room .txt)')
      asked = cli.parse_labels(queries_text, '--queries') if queries_text and queries_text.strip() else []
      if not asked:
        raise InputError('type at least one query (comma-separated)')
      xyz, rgb = scene_queries.read_scene(scene_path)
      if self.class_features:
        vocabulary = prediction.file_labels(self.class_features)
      else:
        try:
          vocabulary = scene_queries.training_vocabulary(self.scoring)
        except InputError:  # trained on data whose class names are not at hand: S3DIS's
          vocabulary = list(s3dis.S3DIS_CLASSES)
      classifier = None
      if self.class_features:
        labels = scene_queries.label_set(asked, vocabulary)
        classifier = prediction.label_features(self.class_features, labels, self.loaded.embed_dim)
      result = scene_queries.query_scene(self.scoring, xyz, asked, vocabulary, rgb=rgb, classifier=classifier)
      out = tempfile.mkdtemp(prefix='cg3d_scene_')
      summary = outputs.write_query_outputs(out, xyz, rgb, result, scene=str(scene_path))
    except (InputError, ValueError) as err:
      return None, '', [], f'error: {err}'
    answers = '\n'.join(
      f'- **{r["query"]}**: {"present" if r["present"] else "absent"} (margin {r["score"]:.3f}, threshold '
      f'{r["threshold"]})'
      for r in summary['results']
    )
    files = sorted(str(p) for p in pathlib.Path(out).rglob('*') if p.is_file())
    figure = heat_figure(xyz, result.point_scores[:, 0], f'{asked[0]}: per-point relevance')
    return figure, answers, files, f'{pathlib.Path(scene_path).name}: {len(xyz)} points, {len(result.regions)} regions'

  def show(self, hits: list[dict], index: int):
    """(3D figure, message) of the chosen search hit, read from the folder the library was embedded from (or the
    library's preview of a dataset split's row)."""
    import numpy as np

    from cg3d_jax.data.formats import point_files

    try:
      if not hits or not 0 <= index < len(hits):
        raise InputError('choose a shape in the gallery')
      hit = hits[index]
      if hit.get('cloud'):  # a dataset split's row: its preview cloud (xyz, rgb in [0, 1])
        kept = np.load(hit['cloud'], allow_pickle=False).astype(np.float32)
        xyz, rgb = kept[:, :3], kept[:, 3:6]
      else:
        cloud = point_files.read_points(pathlib.Path(self.library.shapes or '') / hit['file'])
        xyz, rgb = cloud.xyz, cloud.rgb
    except (InputError, ValueError, OSError) as err:
      return None, f'error: {err}'
    return cloud_figure(xyz, rgb, hit['file']), f'{hit["file"]} (similarity {hit["score"]:.3f})'


def _pixels(path: str):
  import numpy as np
  from PIL import Image

  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def build_app(page: Page):
  import gradio as gr

  with gr.Blocks(title='cg3d-jax', analytics_enabled=False) as app:
    gr.Markdown('# cg3d-jax')
    described = gr.Markdown(page.describe, elem_id='loaded')
    with gr.Tab('Classify'):
      with gr.Row():
        with gr.Column():
          upload = gr.File(label='point cloud', file_types=['.ply', '.npy', '.off', '.txt', '.xyz', '.csv'])
          labels = gr.Textbox(label='labels (comma-separated)', placeholder='owl, chicken, penguin')
          preset = gr.Dropdown(list(PRESETS), value=None, label='or a preset')
          go_button = gr.Button('Classify', variant='primary')
          message = gr.Markdown(elem_id='classify-message')
          top = gr.Dataframe(headers=['rank', 'label', 'probability'], label='top 5', elem_id='classify-top')
        view = gr.Plot(label='the cloud', elem_id='classify-view')
      go_button.click(page.classify, [upload, labels, preset], [view, top, message], api_name='classify')
    with gr.Tab('Search'):
      with gr.Row():
        folder = gr.Textbox(label='library folder', value=str(page.library.root) if page.library else '')
        load_button = gr.Button('Load library')
      load_message = gr.Markdown(elem_id='library-message')
      load_button.click(page.load_library, [folder], [load_message, described], api_name='load_library')
      with gr.Row():
        query = gr.Textbox(label='text', placeholder='a wooden chair')
        image = gr.Image(type='filepath', label='or an image', height=120)
        cloud = gr.File(label='or a cloud', file_types=['.ply', '.npy', '.off', '.txt', '.xyz', '.csv'])
        k = gr.Number(value=8, precision=0, label='k')
        min_score = gr.Number(value=None, label='minimum similarity')
      search_button = gr.Button('Search', variant='primary')
      search_message = gr.Markdown(elem_id='search-message')
      hits = gr.State([])
      gallery = gr.Gallery(label='matches', columns=8, elem_id='search-gallery')
      shown = gr.Plot(label='the chosen shape')
      shown_message = gr.Markdown()
      search_inputs = [query, k, min_score, image, cloud]
      search_button.click(page.search, search_inputs, [gallery, hits, search_message], api_name='search')

      def chosen(found, event: gr.SelectData):
        return page.show(found, event.index)

      gallery.select(chosen, [hits], [shown, shown_message])
    with gr.Tab('Scene'):
      with gr.Row():
        with gr.Column():
          scene_file = gr.File(label='scene', file_types=['.ply', '.npy', '.off', '.txt', '.xyz', '.csv'])
          scene_queries = gr.Textbox(label='queries (comma-separated)', placeholder='chair, table, lamp')
          scene_button = gr.Button('Query', variant='primary')
          scene_message = gr.Markdown(elem_id='scene-message')
          presence = gr.Markdown(elem_id='scene-presence')
          downloads = gr.File(label='outputs', file_count='multiple')
        heat = gr.Plot(label='relevance of the first query')
      scene_button.click(
        page.scene, [scene_file, scene_queries], [heat, presence, downloads, scene_message], api_name='scene'
      )
  return app


def main(argv):
  del argv
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no request leaves the machine
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d')
  if LIBRARY_DIR.value and not os.path.isdir(LIBRARY_DIR.value):
    raise InputError(f'--library {LIBRARY_DIR.value}: no such folder (cg3d-embed writes one)')
  page = Page(
    checkpoint,
    clip_path=CLIP.clip_path.value,
    library=LIBRARY_DIR.value,
    class_features=CLASS_FEATURES.value,
    templates=TEMPLATES.value,
    step=CHECKPOINT.step.value,
    num_points=CLIP.num_points.value,
  )
  print(f'serving {page.describe} on http://{HOST.value}:{PORT.value}', flush=True)
  build_app(page).launch(server_name=HOST.value, server_port=PORT.value, show_error=True)


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
