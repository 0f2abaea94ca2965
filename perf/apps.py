"""The server pod's applications: nginx (HTTP) and iperf3 (bulk TCP), and the request body.

nginx runs as one process (``master_process off``: the process we start is the one that
serves, so it is stopped by PID like every pod application), keeps connections alive for the
whole suite (``keepalive_requests`` high, 300 s idle timeout) and answers:
- ``/``: 3 bytes (``ok``), for closed-loop req/s and new connections per second;
- ``/1k``: 1 KiB (accepting a request body of up to 64 KiB), for the fixed-rate latency run,
  which POSTs a 1 KiB body (:data:`BODY_1K`), so 1 KiB travels each way.
"""

from __future__ import annotations

from pathlib import Path

NGINX = "/usr/sbin/nginx"
IPERF3 = "/usr/bin/iperf3"
HTTP_PORT = 80
IPERF_PORT = 5201
BODY_1K = b"a" * 1024


def nginx_config(workdir: Path, port: int = HTTP_PORT) -> str:
    """nginx.conf for one server pod; everything it writes goes under ``workdir``."""
    w = str(workdir)
    body = "x" * 1023 + "\\n"
    temps = "\n".join(f"  {k}_temp_path {w}/{k};"
                      for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process off;
worker_rlimit_nofile 16384;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
{temps}
  server {{
    listen {port} reuseport backlog=4096;
    location = / {{ return 200 "ok\\n"; }}
    location = /1k {{ client_body_buffer_size 64k; return 200 "{body}"; }}
  }}
}}
"""


def nginx_argv(conf: Path) -> list[str]:
    return [NGINX, "-c", str(conf), "-p", str(conf.parent)]


def iperf3_server_argv(port: int = IPERF_PORT) -> list[str]:
    return [IPERF3, "-s", "-p", str(port)]


def write_body(workdir: Path) -> Path:
    p = workdir / "body-1k"
    p.write_bytes(BODY_1K)
    return p
