"""The attention backends and where each can run. Imports no JAX at module level: the engine's
argument parsing validates against :data:`ATTENTION_BACKENDS` before anything loads JAX."""

from __future__ import annotations

# "reference": plain jnp; "pallas": the Pallas (Triton lowering) kernels; "mosaic": "pallas", with
# the Mosaic GPU prefill kernel for large mixed steps on Hopper (see attention_router).
ATTENTION_BACKENDS = ("reference", "pallas", "mosaic")


def default_attention_backend(platform: str | None = None) -> str:
    """"pallas" when running on a GPU, else "reference" (the Triton kernels need a GPU).

    ``platform`` defaults to JAX's default backend ("gpu"/"cuda"/"rocm", "cpu", "tpu").
    """
    if not platform:
        import jax  # only when asked about this machine

        platform = jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm") else "reference"


def check_attention_backend(backend: str, platform: str | None = None, compute_capability: str | None = None) -> None:
    """Raises ValueError naming ``attention_backend`` when ``backend`` cannot run here: the Pallas
    kernels need a GPU (on CPU they run only in the interpreter, which tests use directly) and the
    Mosaic GPU prefill kernel a Hopper one (compute capability 9.x).

    ``platform`` / ``compute_capability`` default to JAX's default backend and its first device."""
    if backend == "reference":
        return
    if not platform:
        import jax

        platform = jax.default_backend()
    if platform not in ("gpu", "cuda"):
        raise ValueError(
            f"attention_backend={backend!r} needs an NVIDIA GPU (JAX platform here: {platform!r}); "
            "use 'reference' or leave attention_backend unset"
        )
    if backend == "mosaic":
        if not compute_capability:
            import jax

            compute_capability = getattr(jax.devices()[0], "compute_capability", "")
        if not str(compute_capability).startswith("9"):
            raise ValueError(
                f"attention_backend='mosaic' needs a Hopper GPU (compute capability 9.x, here {compute_capability!r}); "
                "use 'pallas' or leave attention_backend unset"
            )
