"""Test setup: simulate 4 CPU devices (before JAX is imported), keep everything offline, share
one XLA compilation cache, and the torch/torchvision fixtures of the `[torch]` tests."""

import atexit
import os
import shutil
import tempfile

# In-process tests compile hundreds of small programs that each run a few times: XLA's fast
# compilation (runner.FAST_COMPILE: same values, slower to run) halves their CPU time. CLI runs
# get the default level back from tests/runner.py's env_with_devices unless they ask for it.
os.environ.setdefault(
  'XLA_FLAGS',
  '--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0'
  ' --xla_cpu_use_fusion_emitters=false',
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault(
  'TFDS_DATA_DIR', os.path.join(os.path.dirname(__file__), '..', '.pytest_cache', 'tfds')
)

# One XLA compilation cache per test session, shared by this process, the pytest-xdist workers
# and every CLI run the tests spawn (they inherit the environment): the same ResNet-8 train/eval
# steps are otherwise compiled afresh by each of ~100 processes. A cache hit loads the executable
# XLA compiled, so results are bit-identical; a fresh directory per session keeps each session
# independent. Under xdist the controller imports this file before it starts the workers, so
# they find the variable set and neither make nor remove a directory of their own.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='resnet_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  # Every program, however quick to compile: a warm digits CLI run has ~40 small ones (state
  # init, checkpoint slicing, metrics) besides its steps; caching them too cut its CPU time
  # 3.75 s -> 2.9 s (2026-11-24).
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# Grain's worker processes read absl flags; tests run outside absl.app, so use the defaults.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """End-to-end (`slow`) tests first: pytest-xdist hands tests out in this order, so the
  longest start early rather than one of them running alone at the end of the session."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
  """`--dist loadscope` (pyproject.toml's addopts), with test functions spread one by one.

  xdist's loadscope keeps a whole module on one worker, and its `xdist_group` mark does not work
  on pytest 9.2 (pytest-xdist issue 1386). Here a test class is the unit that stays together: the
  tests that share a module fixture live in one class, so it is built once, and every other test
  goes to whichever worker is free.
  """
  if config.getoption('dist') != 'loadscope':
    return None
  from xdist.scheduler import LoadScopeScheduling

  class ClassScopeScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return xdist_unit(nodeid)

  return ClassScopeScheduling(config, log)


def xdist_unit(nodeid: str) -> str:
  """The unit of work a test belongs to: its class (`path::Class`), else the test itself."""
  path, _, rest = nodeid.partition('::')
  name = rest.partition('[')[0]  # parameter ids may hold '::'
  return f'{path}::{name.partition("::")[0]}' if '::' in name else nodeid


@pytest.fixture(scope='session', autouse=True)
def _four_cpu_devices():
  """Starts JAX's backend with the 4 devices above before any test runs.

  The backend reads XLA_FLAGS once, when it starts: a test that changes XLA_FLAGS for the CLI
  runs it spawns and then calls JAX in-process would otherwise start it with 1 device for
  every test after it on that worker (test_sweep's Fig. 7 step did, depending on test order).
  """
  import jax

  jax.devices()


@pytest.fixture(scope='session')
def torch():
  """The optional `[torch]` extra; tests that take it are skipped without it."""
  return pytest.importorskip(
    'torch', reason='torch is an optional extra: pip install -e ".[torch]"'
  )


@pytest.fixture(scope='session')
def tv(torch):
  """``torchvision.models.resnet``.

  The only torchvision wheels on PyPI for recent torch are CUDA builds whose compiled ops cannot
  load without CUDA ("operator torchvision::nms does not exist"); the ResNet definitions are pure
  Python, so then we import the subpackage without running ``torchvision/__init__`` (which registers
  those ops). The model code used is torchvision's own either way.
  """
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    pytest.skip('torchvision is an optional extra: pip install -e ".[torch]"')
  try:
    from torchvision.models import resnet

    return resnet
  except (RuntimeError, OSError):
    for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
      del sys.modules[name]
    package = types.ModuleType('torchvision')
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules['torchvision'] = package
    from torchvision.models import resnet

    return resnet


@pytest.fixture(scope='session')
def randomise_bn(torch):
  """`randomise_bn(model)`: every BatchNorm's affine and statistics drawn at random (stricter than
  trained weights: every BN counts, a mixed-up mean/var shows)."""

  def randomise(model):
    with torch.no_grad():
      for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0.0, 0.2)
          m.running_mean.normal_(0.0, 0.2)
          m.running_var.uniform_(0.5, 2.0)
    return model

  return randomise


@pytest.fixture(scope='session')
def random_torchvision(torch, tv, randomise_bn):
  """`random_torchvision(name, seed=0, **kwargs)`: a torchvision model in eval mode with random
  weights and randomised BN (`randomise_bn`)."""

  def build(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomise_bn(getattr(tv, name)(**kwargs).eval())

  return build


@pytest.fixture
def converted_random_weights(torch, random_torchvision, tmp_path):
  """`converted_random_weights(name, seed)`: `random_torchvision(name, seed)` saved as a torch
  state dict and put through `python -m resnet_jax.convert ... --in-channels 1` (digits are grey);
  returns (the .pth path, the converted directory)."""
  from resnet_jax import convert

  def build(name: str, seed: int):
    weights, converted = tmp_path / f'{name}.pth', tmp_path / 'converted'
    torch.save(random_torchvision(name, seed=seed).state_dict(), weights)
    convert.main(
      [
        '--arch',
        name,
        '--torchvision-weights',
        str(weights),
        '--out',
        str(converted),
        '--in-channels',
        '1',
      ]
    )
    return weights, converted

  return build
