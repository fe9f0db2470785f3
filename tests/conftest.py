"""Test setup: 8 fake CPU devices (set before JAX initialises) and GPU/TPU markers."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_collection_modifyitems(config, items):
  del config
  platform = jax.default_backend()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and platform != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()}"))
