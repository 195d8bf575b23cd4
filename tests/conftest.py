"""Test setup: simulate 4 CPU devices (before JAX is imported) and keep everything offline."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault(
  'TFDS_DATA_DIR', os.path.join(os.path.dirname(__file__), '..', '.pytest_cache', 'tfds')
)

# Grain's worker processes read absl flags; tests run outside absl.app, so use the defaults.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
