"""Shared pytest setup."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA CPU executable keeps memory mappings of its
    own; the whole suite in one process compiled enough of them to reach the kernel's limit of 65530 mappings
    (`vm.max_map_count`), where the next compile crashed with a segmentation fault."""
    yield
    jax.clear_caches()
