"""The tests' tiny training config: the demo shrunk so that a training step compiles and runs in seconds on a CPU.

  python -m cg3d_jax.train --config tests/configs/tiny_test.py --workdir W --config.clip.path=C \
      --config.data.manual_dir=M --config.data.data_dir=D

tests/conftest.py's tiny_config builds the in-process tests' configs from this file, and the multi-process tests
launch it by its path; the CLIP folder and the prepared dataset are given on the command line (the tests' fixtures
write them). tests/test_multihost.py checks that the config a launched process parsed from this file and its
`--config.*` overrides equals the in-process one, so the two runs it compares train the same thing. It lives with the
tests, not in configs/: it is not an experiment, and the wheel does not ship it.
"""

from cg3d_jax.configs import demo


def get_config(arg=None):
  del arg
  c = demo.get_config()
  c.data.num_stored_points = 256
  c.data.shuffle_buffer = 64
  c.model.embed_dim = 32
  c.model.num_points = 64
  c.model.point_transformer.update(dict(width=32, depth=2, num_heads=2, num_groups=16, group_size=8, encoder_dim=32))
  c.train.batch_size = 16
  c.train.total_steps = 6
  c.train.log_every = 2
  c.eval.every_steps = 0
  c.eval.batch_size = 16
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.logging.tensorboard = False
  return c
