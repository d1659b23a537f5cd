import os

# Tests run on CPU in float32; keep XLA from grabbing all cores' worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JAXPAGED_TEST_ALL") != "1":  # `make test-all` sets it
        exhaustive = pytest.mark.skip(reason="exhaustive: run by `make test-all`")
        for item in items:
            if "exhaustive" in item.keywords:
                item.add_marker(exhaustive)
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # Each module compiles dozens of models and engines; XLA:CPU keeps every executable's code
    # mapped, and a whole-suite process accumulating thousands of them crashed in the compiler.
    yield
    import gc

    gc.collect()
    jax.clear_caches()
