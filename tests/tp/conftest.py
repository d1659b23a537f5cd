"""The tensor-parallel tests need 8 devices: on CPU, XLA's fake host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), which must be set before JAX starts. The
main test session runs with one device, so there these tests skip and
``tests/engine/test_tensor_parallel.py`` runs this directory in a process of its own."""

import jax
import pytest

NUM_DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= NUM_DEVICES:
        return
    skip = pytest.mark.skip(reason=f"needs {NUM_DEVICES} devices: run by tests/engine/test_tensor_parallel.py "
                                   "in a process with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    for item in items:
        if "tests/tp/" in item.nodeid.replace("\\", "/") or item.nodeid.startswith("tp/"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_compiled_programs_per_test():
    # Every test here builds models or engines for up to 8 devices; XLA:CPU keeps each executable's
    # code mapped, so release them test by test rather than once per module.
    yield
    import gc

    gc.collect()
    jax.clear_caches()
