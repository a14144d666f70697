"""A local Ray for single-machine runs: reachable from this machine only, gone when its driver is.

``init_ray(address=None, num_cpus=n)`` is how `rig train` and `rig collect` start Ray; with an
address (``auto``, ``host:port``) it joins that cluster exactly as ``ray.init`` does.

Loopback only. Ray's servers (GCS, raylet, object manager, core workers, agents) listen on the
node IP, which on Linux is the machine's routable address: a debug run on a laptop in a café
would offer them to the network. On Windows and macOS Ray takes 127.0.0.1 as the node IP for a
local cluster instead (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset); setting it to 0 selects the
same on Linux, so every server listens on 127.0.0.1 alone. It is set only while Ray starts (the
servers inherit it), so a later ``ray.init(address=...)`` in the same process is unaffected.

Nothing left running. On SIGKILL of the driver, gcs_server, raylet and the workers die with it
(Ray's fate sharing), but raylet's agents (DashboardAgent, RuntimeEnvAgent) are re-parented to
init and run forever, and every later run starts another set. A watchdog process (this file run
as a script, in its own session so Ctrl-C does not take it first) snapshots the driver's process
tree every second and, once the driver is gone, ends what is left of it: SIGTERM, then SIGKILL
after 5 s. It needs ``psutil`` (a dependency of deepspeed and of Ray's own tooling).

Token auth stays on (Ray's default for a local cluster since 2.52), chosen explicitly so that
Ray does not print that it chose it on every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
WATCH_PERIOD_S = 1.0
_watchdog: subprocess.Popen | None = None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a loopback-only local Ray with a watchdog (``address=None``), or join ``address``."""
    import ray

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is not None:
        ray.init(address=address, **quiet)
        return
    from ray._private import ray_constants

    if "RAY_AUTH_MODE" not in os.environ:  # RAY_AUTH_MODE=disabled (or token) still wins
        # Token auth is Ray's default for a local cluster; chosen here as ray.init chooses it
        # (the variable, then its C++ config reloaded), Ray does not print a notice every run.
        with contextlib.suppress(ImportError, AttributeError):
            from ray._private.authentication import authentication_token_setup as auth

            auth._enable_token_auth()
    before = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when the node IP is chosen, inside init
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before[1]
        if before[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before[0]
    start_watchdog()


def start_watchdog() -> None:
    """One watchdog per driver process (a second call while it runs does nothing)."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    _watchdog = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _watch(driver_pid: int) -> None:
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    me = os.getpid()
    tree: dict[int, psutil.Process] = {}  # pid -> process (with its start time: no pid reuse)
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me:
                    tree.setdefault(child.pid, child)
            tree = {pid: p for pid, p in tree.items() if p.is_running()}
        except psutil.NoSuchProcess:
            break
        time.sleep(WATCH_PERIOD_S)
    left = [p for p in tree.values() if p.is_running()]
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
