"""``make soak``: the long load and soak run on the local mesh; writes tests/soak/results.json.

Three parts (``--only`` picks some):

* ``hold``: ``--connections`` (10,000) concurrent connections from one client application
  through node-a's ztunnel to the server on node-b, held, a line exchanged on each when
  opened and again before closing; ztunnels' RSS, descriptors and live connections before,
  at the peak and after;
* ``rate``: ``--rate`` (1,000) new connections per second for ``--seconds`` (60): failures
  and latency percentiles of connect + echo + close; RSS and descriptors after;
* ``peers``: ``--peers`` (20) slow HBONE peers of each kind at once against node-b's ztunnel,
  on a second mesh with short timeouts (handshake 2 s, idle 5 s): each must be closed.

The first two use ztunnel's default settings but for a 15 s pool release (see
``LOAD_SETTINGS``); ``hold`` runs ``--hold-rounds`` (2) times. Every wait is bounded;
the meshes are removed on every path. Run as root: ``.venv/bin/python -m tests.soak.run``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.soak import harness

RESULTS = Path(__file__).with_name("results.json")
PEER_TIMEOUTS = {"HBONE_HANDSHAKE_TIMEOUT": "2s", "HBONE_IDLE_TIMEOUT": "5s"}
# Default timeouts, but the client pool lets unused HBONE connections go after 15 s instead
# of 5 min, so "descriptors back to the baseline" is reached within the settle wait.
LOAD_SETTINGS = {"POOL_UNUSED_RELEASE_TIMEOUT": "15s"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--peers", type=int, default=20)
    ap.add_argument("--hold-rounds", type=int, default=2)
    ap.add_argument("--only", default="hold,rate,peers")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--merge", action="store_true",
                    help="update only the parts run in an existing --out file")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    parts = set(a.only.split(","))
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "cpus": os.cpu_count(), "load_at_start": harness.load_average()}
    oks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="soak") as tmp:
        if parts & {"hold", "rate"}:
            with harness.SoakMesh(Path(tmp), LOAD_SETTINGS) as sm:
                if "hold" in parts:
                    # Twice: CPython keeps the heap it grew to (RSS is a high-water mark), so
                    # a leak shows as growth from the first round's "after" to the second's.
                    rounds = []
                    for i in range(a.hold_rounds):
                        print(f"hold round {i + 1}: {a.connections} concurrent connections ...",
                              flush=True)
                        h = harness.hold_scenario(sm, a.connections, max_seconds=900)
                        rounds.append(asdict(h))
                        oks["hold"] = oks.get("hold", True) and (
                            h.peak["failed"] == 0 and h.done["close_failed"] == 0)
                        print(json.dumps(rounds[-1]), flush=True)
                    out["hold"] = rounds
                if "rate" in parts:
                    print(f"rate: {a.rate:g}/s for {a.seconds:g}s ...", flush=True)
                    r = harness.rate_scenario(sm, a.rate, a.seconds)
                    out["rate"] = asdict(r)
                    # Correctness is "no connection failed"; whether this machine could offer
                    # the whole rate (nothing skipped at --max-inflight) is capacity, kept apart.
                    oks["rate"] = r.result["failed"] == 0
                    out["rate_target_met"] = r.result["skipped_max_inflight"] == 0
                    print(json.dumps(out["rate"]), flush=True)
        if "peers" in parts:
            with harness.SoakMesh(Path(tmp), PEER_TIMEOUTS) as sm:
                print(f"peers: {a.peers} of each slow kind ...", flush=True)
                p = harness.slow_peer_scenario(sm, a.peers, 90, PEER_TIMEOUTS)
                d = asdict(p)
                d["summary"] = harness.summarize_peers(p.outcomes)
                del d["outcomes"]
                out["peers"] = d
                oks["peers"] = all(k["closed"] == k["peers"] for k in d["summary"].values())
                print(json.dumps(d), flush=True)
    out["ok_parts"] = oks
    if a.merge and Path(a.out).exists():  # keep the parts not run this time
        merged = json.loads(Path(a.out).read_text())
        for part in ("hold", "rate", "peers"):
            if part in out:
                merged[part] = out[part]
                merged.setdefault("started_parts", {})[part] = out["started"]
        merged["ok_parts"] = {**merged.get("ok_parts", {}), **oks}
        out = merged
    ok = all(out["ok_parts"].values())
    out["ok"] = ok
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"soak: {'ok' if ok else 'FAILURES'}; results in {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
