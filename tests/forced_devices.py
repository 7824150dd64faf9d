"""A test module's child run on forced CPU devices (XLA_FLAGS must be set before JAX starts, so
the child is a new process): `python script *args`, whose last line of output is one JSON
object."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def child_json(script, *args, devices: int, flags: str = "", timeout: int = 300) -> dict:
    """The JSON object `script` prints last when run with `args` on `devices` CPU devices and
    the extra XLA `flags`; a failed child fails the test with its stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {flags}"}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
