"""cg3d-jax: CG3D ("CLIP goes 3D") in JAX/Flax."""

import importlib.util
import os
import sys

__version__ = '0.1.0'

# The experiment configs live at the repository's top level (configs/, beside cg3d_jax/, launch/, tests/) and are
# imported as cg3d_jax.configs: a wheel installs them there (pyproject.toml's package-dir); run from a source tree
# (a clone on PYTHONPATH, an editable install), the package finds them beside itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_CONFIGS = os.path.join(os.path.dirname(_HERE), 'configs')
if not os.path.isdir(os.path.join(_HERE, 'configs')) and os.path.isfile(os.path.join(_SOURCE_CONFIGS, '__init__.py')):
  _spec = importlib.util.spec_from_file_location(
    f'{__name__}.configs', os.path.join(_SOURCE_CONFIGS, '__init__.py'), submodule_search_locations=[_SOURCE_CONFIGS]
  )
  configs = importlib.util.module_from_spec(_spec)
  sys.modules[_spec.name] = configs
  _spec.loader.exec_module(configs)
