"""Shared test settings: CPU only, 8 forced host devices for sharding tests, and compiling
made cheap (compilation is most of the suite's time: a tiny model's train step compiles in
about 5 s and then runs in milliseconds)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# LLVM's level 0 instead of 2: compiling takes about 35% less time, running about 50% more,
# a good trade for programs run a few times. The XLA graph (fusion, layouts) is the same.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
# One compilation cache for the session, shared by the tests and the training processes they
# start: a program compiled before (the same train step in two tests, a resumed run) is
# loaded, not compiled again. Emptied at the end; set JAX_COMPILATION_CACHE_DIR to keep one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jif-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


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
