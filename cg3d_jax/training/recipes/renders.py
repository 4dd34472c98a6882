"""CG3D's method on OpenShape's data: its renders through the frozen, prompt-tuned image tower (config.clip.path: the
CLIP the stored text features came from), the stored per-sample text features as text targets; the step, schedule
and validation are CG3D's recipe's."""

from cg3d_jax.data.sources.source import TrainData
from cg3d_jax.errors import ConfigError
from cg3d_jax.training.recipes import cg3d
from cg3d_jax.training.recipes.recipe import Recipe


def recipe(config, data: TrainData) -> Recipe:
  if config.train.same_class_mask:
    raise ConfigError("config.train.same_class_mask needs class labels; OpenShape's layout has none: set it False")
  setup = cg3d.build_setup(config, train_classes=None, steps_per_epoch=data.steps_per_epoch)
  if setup.clip.spec.projection_dim != data.feature_dim:
    raise ConfigError(
      f'the CLIP at {config.clip.path} projects to {setup.clip.spec.projection_dim} but the stored '
      f'text features are {data.feature_dim}-dimensional: give the CLIP they came from '
      '(OpenShape: OpenCLIP ViT-bigG-14, laion2b_s39b_b160k, 1280)'
    )
  return cg3d.recipe(config, data, setup)
