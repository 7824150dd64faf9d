"""A persistent XLA compilation cache for a test module whose runs recompile the same programs
(each new program object compiles again; with the cache only the first compile is paid).
Results are those of the same executables either way. `FAST_COMPILE`: XLA flags for child
processes whose few steps take far less than their compiles."""

import contextlib

import jax
import pytest

# LLVM's expensive passes off: about a third less compile time, the same HLO (partitioning,
# collectives); every launch of a comparison must get the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@contextlib.contextmanager
def persistent_compilation_cache(directory):
    """Caches every compile in `directory` while active; yields the environment variables that
    give child processes the same cache ({} where this JAX lacks the cache's reset)."""
    try:
        from jax._src import compilation_cache as cache  # reset_cache: private, hence the guard.
        reset = cache.reset_cache
    except (ImportError, AttributeError):
        yield {}
        return
    options = {"jax_compilation_cache_dir": str(directory),
               "jax_persistent_cache_min_compile_time_secs": 0,
               "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    reset()
    try:
        yield {name.upper(): str(value) for name, value in options.items()}
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        reset()


def module_cache(env: dict):
    """A module-scoped autouse fixture: the module's runs share one persistent cache, and `env`
    holds the variables that give its child processes the same cache while it is active."""
    @pytest.fixture(scope="module", autouse=True)
    def compilation_cache(tmp_path_factory):
        with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")) as cache_env:
            env.update(cache_env)
            yield
            env.clear()
    return compilation_cache
