r"""Write the offline demo's data and CLIP: `python -m cg3d_jax.demo_assets --config demo --root DIR`.

A procedural dataset in the ShapeNet-55 layout and a small random transformers CLIP (from the real BPE vocabulary
the package ships), sized by the config's `demo` block; prints the overrides that point training at them:

  python -m cg3d_jax.train --config demo --workdir W --config.data.manual_dir=DIR/shapenet55 \
      --config.data.data_dir=DIR/tfds --config.clip.path=DIR/clip
"""

import jax
from absl import flags

from cg3d_jax import cli

ROOT = cli.root_flag()  # receives shapenet55/, clip/ and (at the first training run) tfds/
flags.adopt_module_key_flags(cli)  # after the definitions above: adopting copies the key flags defined so far


def main(argv):
  del argv
  config = cli.require_config()
  root = cli.require(ROOT, '--root /tmp/cg3d_demo/demo_assets')
  from cg3d_jax.synthetic import demo_inputs, shapes
  from cg3d_jax.training import config_checks

  # The devices the demo's training run will split its batch over: this machine's, as that run's.
  config_checks.check_demo_run(config, device_count=jax.device_count(), families=len(shapes.FAMILIES))
  assets = demo_inputs.write(root, config.demo)
  print(' '.join(assets.overrides()))


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
