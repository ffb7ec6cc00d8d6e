"""Shared test settings: CPU only, 8 forced host devices for sharding tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


def _import_anyio_eagerly() -> None:
    """anyio is a pytest plugin, so pytest compiles its modules itself (assertion rewriting),
    and anyio imports most of them lazily, on first use. The first use can be in the app's
    server thread while the main thread compiles too, which CPython 3.11 can fail with
    "SystemError: AST constructor recursion depth mismatch" (a page that never loads in the
    browser test). Importing them here, in the main thread, takes about 0.1 s."""
    import importlib

    import anyio

    for name in ("_backends._asyncio", "from_thread", "to_thread", "to_process", "streams.file"):
        importlib.import_module(f"anyio.{name}")
    for name in dir(anyio):
        getattr(anyio, name)


_import_anyio_eagerly()
