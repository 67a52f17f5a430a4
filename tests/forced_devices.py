"""Run a test file as its own process on 8 forced CPU devices.

pytest imports jax before any test runs, so a device count set in XLA_FLAGS only takes effect in a new process: the
multi-device tests run their own file's `__main__` block through `run_on_8_cpu_devices`.
"""

import os
import pathlib
import subprocess
import sys


def run_on_8_cpu_devices(test_file: str, ok_marker: str, timeout_s: int = 400) -> str:
    """Runs `python test_file` with 8 forced CPU devices; returns its stdout after checking that it exited 0 and
    printed `ok_marker`."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    path = pathlib.Path(test_file)
    proc = subprocess.run([sys.executable, str(path)], env=env, cwd=path.parent, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert ok_marker in proc.stdout, proc.stdout[-3000:]
    return proc.stdout
