"""The local Ray of `rig train` and `rig collect` (actors/local.py): every server it starts listens
on the loopback interface only, token auth is on without a notice on every run, and a SIGKILL of
its driver leaves no process of it running.

Component tier, tens of seconds: one driver subprocess starts Ray and an actor, reports its
process tree and listening sockets, and is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import json, os, sys, time
import psutil, ray
from actors.local import init_ray

init_ray(num_cpus=1)

@ray.remote
class Pid:
    def pid(self):
        return os.getpid()

actor = Pid.remote()
ray.get(actor.pid.remote())
time.sleep(2)  # the agents and the watchdog's first snapshot
me = psutil.Process()
tree = me.children(recursive=True)
listen = []
for p in [me, *tree]:
    try:
        listen += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print(json.dumps({"tree": [[p.pid, p.create_time(), p.name()] for p in tree],
                  "listen": listen}), flush=True)
time.sleep(600)
"""
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _alive(tree) -> list:
    left = []
    for pid, created, name in tree:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append((pid, name))
        except psutil.NoSuchProcess:
            pass
    return left


def test_local_ray_listens_on_loopback_and_dies_with_its_driver():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_AUTH_MODE", None)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    tree: list = []
    try:
        line = driver.stdout.readline()
        assert line, f"the driver exited with {driver.wait()}"
        report = json.loads(line)
        tree = report["tree"]
        names = {name for _, _, name in tree}
        assert {"gcs_server", "raylet"} <= names, names
        assert report["listen"], "Ray's servers listen somewhere"
        exposed = [(name, ip) for name, ip in report["listen"] if ip not in LOOPBACK]
        assert not exposed, f"listening beyond loopback: {exposed}"

        driver.send_signal(signal.SIGKILL)
        _, err = driver.communicate()
        assert "Token authentication" not in err, err  # chosen explicitly: no notice each run
        deadline = time.monotonic() + 60
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"still running after the driver was killed: {_alive(tree)}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid, _ in _alive(tree):  # only the processes this test started
            os.kill(pid, signal.SIGKILL)
