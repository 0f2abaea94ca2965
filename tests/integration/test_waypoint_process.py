"""``python -m waypoint`` as a process: local manifests, local CA, ports, readiness, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile

import yaml
from test_waypoint_helpers import _CA, http_get, manifests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_process_becomes_ready_serves_config_dump_and_drains_on_sigterm() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ca_dir = os.path.join(tmp, "ca")
            _CA.save_dir(ca_dir)
            path = os.path.join(tmp, "manifests.yaml")
            with open(path, "w") as f:
                yaml.safe_dump_all(manifests(), f)
            ports = {k: _free_port() for k in ("hbone", "stats", "ready", "admin")}
            env = {**os.environ, "WAYPOINT_NAME": "waypoint", "POD_NAMESPACE": "shop",
                   "LOCAL_MANIFESTS_PATH": path, "FAKE_CA": "true", "CA_DIR": ca_dir,
                   "WAYPOINT_HBONE_ADDR": f"127.0.0.1:{ports['hbone']}",
                   "STATS_ADDR": f"127.0.0.1:{ports['stats']}",
                   "READINESS_ADDR": f"127.0.0.1:{ports['ready']}",
                   "ADMIN_ADDR": f"127.0.0.1:{ports['admin']}",
                   "CONNECTION_TERMINATION_DEADLINE": "1", "LOG_FORMAT": "json"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "waypoint", env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            try:
                status = 0
                for _ in range(200):  # up to ~20 s for start-up
                    try:
                        status, _ = await http_get(ports["ready"], "/healthz/ready")
                    except OSError:
                        status = 0
                    if status == 200:
                        break
                    await asyncio.sleep(0.1)
                assert status == 200
                status, body = await http_get(ports["admin"], "/config_dump")
                assert status == 200
                dump = json.loads(body)
                assert dump["waypoint"]["identity"] == "spiffe://cluster.local/ns/shop/sa/waypoint"
                assert dump["protocols"]["shop/reviews.shop.svc.cluster.local"] == {"80": "http"}
                status, text = await http_get(ports["stats"], "/metrics")
                assert status == 200 and 'istio_build{component="waypoint"' in text
                proc.send_signal(signal.SIGTERM)
                rc = await asyncio.wait_for(proc.wait(), 30)
                out = (await proc.stdout.read()).decode() if proc.stdout else ""
                assert rc == 0, out
                assert '"message": "shutting down' in out
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    asyncio.run(asyncio.wait_for(main(), 120))
