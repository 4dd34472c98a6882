"""Cross-modal retrieval on the ShapeNet-55 test split (10,493 objects): text->3D, image->3D, 3D->image, 3D->text.

  python -m cg3d_jax.evaluate --config retrieval_shapenet55 --checkpoint /runs/cg3d --workdir /tmp/ret \
      --config.eval.manual_dir=/data/ShapeNet55 --config.eval.data_dir=/data/tfds

Relevance: text queries (one per class, the class's template ensemble) count every object of that class;
image<->3D pairs count only the same object (view `eval.view_index` of object i <-> cloud of object i); 3D->text
counts the object's own class caption (its recall@1 is zero-shot top-1 over the 55 classes).
Writes retrieval.json and retrieval_grid.png (top matches, as rendered views, for a few queries).
"""

from cg3d_jax.configs import zeroshot_modelnet40


def get_config(arg=None):
  c = zeroshot_modelnet40.zeroshot_config('shapenet55_cg3d', 8192, arg)
  c.eval.task = 'retrieval'
  c.eval.ks = (1, 5, 10)
  c.eval.view_index = 0  # which of the five renders is the image of each object
  c.eval.grid_queries = 4  # rows of the PNG grid per query kind (text->3D and image->3D)
  c.eval.grid_matches = 5
  return c
