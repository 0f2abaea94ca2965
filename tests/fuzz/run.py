"""``make fuzz``: the long, coverage-guided fuzz run over every target in ``fuzz.targets``.

Each target runs in its own process under atheris (libFuzzer for CPython) for ``--inputs``
inputs (default 1,000,000), ``--jobs`` targets at a time.  The corpus of each target lives in
``tests/fuzz/corpus/<target>`` (seeded from the target's valid inputs) and persists between
runs; results go to ``tests/fuzz/results.json``.  A target that already has its inputs there
is skipped, and one that was cut short (time limit, interruption) resumes with the inputs it
still owes, so the run can be stopped and restarted at any point.

Findings: an exception other than the target's documented error type is caught by the
harness wrapper, written to ``tests/fuzz/findings/<target>/`` (one file per distinct
exception type and place, keeping the smallest input) and the run goes on; a hang (one input
over ``--timeout`` seconds) or memory growth over ``--rss-limit-mb`` stops the target and
libFuzzer writes the input to the same directory.  Every finding must become a regression
test in ``tests/unit/test_fuzz_regressions.py``.

Usage: ``python tests/fuzz/run.py [--inputs N] [--jobs 2] [--targets a,b] [--max-seconds S]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = Path(os.environ.get("FUZZ_RESULTS", HERE / "results.json"))
CORPUS = HERE / "corpus"
FINDINGS = HERE / "findings"
LOGS = HERE / "logs"
INSTRUMENT = os.environ.get("FUZZ_INSTRUMENT", "ambient,cni,controlplane,ztunnel").split(",")

for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


# ------------------------------------------------------------------------- worker side


def _signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in our code: one finding per place."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(ROOT) in f.filename and "/.venv/" not in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    place = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
    return f"{type(exc).__name__}@{place}"


def worker(name: str, runs: int, seconds: int, timeout: int, rss_mb: int) -> None:
    import atheris

    logging.disable(logging.CRITICAL)  # rejected inputs are logged by design; keep it quiet
    # Coverage feedback from our own packages only: instrumenting h2/hpack/yaml as well made
    # the HBONE targets ~15x slower, for paths our seeds and mutations reach anyway.
    with atheris.instrument_imports(include=INSTRUMENT):
        from fuzz.targets import TARGETS
    target = TARGETS[name]
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for seed in target.seeds():
            (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    found = FINDINGS / name
    found.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}

    def one_input(data: bytes) -> None:
        try:
            target.run(data)
        except Exception as exc:  # noqa: BLE001 - every escape is a finding; record, go on
            sig = _signature(exc)
            if sig in seen and seen[sig] <= len(data):
                return
            seen[sig] = len(data)
            safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", sig)
            (found / f"{safe}.bin").write_bytes(data)
            (found / f"{safe}.txt").write_text(
                "".join(traceback.format_exception(exc))[-4000:], encoding="utf-8")
            print(f"FINDING {sig}: {str(exc)[:200]!r}", file=sys.stderr, flush=True)

    args = [sys.argv[0], str(corpus), f"-runs={runs}", f"-max_len={target.max_len}",
            f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}", f"-max_total_time={seconds}",
            "-print_final_stats=1", f"-artifact_prefix={found}/", "-reload=0"]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


# ------------------------------------------------------------------------- parent side


def _load() -> dict[str, dict[str, object]]:
    try:
        return json.loads(RESULTS.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def _cost(prev: dict[str, object]) -> float:
    """Seconds per input seen before (unknown targets first: they may be slow)."""
    rate = float(prev.get("inputs_per_s", 0) or 0)  # type: ignore[arg-type]
    return 1.0 / rate if rate else 1.0


def _stats(log: str) -> tuple[int, float]:
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    secs = re.findall(r"Done \d+ runs in (\d+) second", log)
    return (int(runs[-1]) if runs else 0), (float(secs[-1]) if secs else 0.0)


def run_target(name: str, runs: int, deadline: float, timeout: int,
               rss_mb: int) -> dict[str, object]:
    """One worker process for ``name``, given what is left of the whole run's time budget."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    start = time.monotonic()
    seconds = int(deadline - start)
    if seconds < 10:
        return {"inputs": 0, "seconds": 0.0, "exit": None, "findings": [],
                "fatal": ["time budget of the run used up"], "corpus": 0}
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--inputs", str(runs),
             "--max-seconds", str(seconds), "--timeout", str(timeout),
             "--rss-limit-mb", str(rss_mb)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False,
            timeout=seconds + 600)
    wall = time.monotonic() - start
    text = log_path.read_text(encoding="utf-8", errors="replace")
    done, _ = _stats(text)
    crash = re.findall(r"(ERROR: libFuzzer: [^\n]*|==\d+== ERROR: libFuzzer: [^\n]*)", text)
    findings = sorted(set(re.findall(r"^FINDING (\S+):", text, re.M)))
    return {"inputs": done, "seconds": round(wall, 1), "exit": proc.returncode,
            "findings": findings, "fatal": crash[:3],
            "corpus": len(list((CORPUS / name).iterdir())) if (CORPUS / name).exists() else 0}


def report() -> None:
    from fuzz.targets import TARGETS

    results = _load()
    print("| target | entry point | inputs tried | inputs/s | long-run findings |")
    print("|--------|-------------|-------------:|---------:|-------------------|")
    for name, t in TARGETS.items():
        r = results.get(name, {})
        found = ", ".join(r.get("findings", []) or []) or "none"  # type: ignore[arg-type]
        if r.get("fatal"):
            found += f"; stopped: {r['fatal']}"
        print(f"| {name} | `{t.entry}` | {int(r.get('inputs', 0)):,} | "  # type: ignore[call-overload]
              f"{r.get('inputs_per_s', '-')} | {found} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--targets", default="", help="comma-separated names (default: all)")
    ap.add_argument("--max-seconds", type=int, default=4 * 3600,
                    help="time bound for the whole run; targets still running then stop and "
                    "resume next time")
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--fresh", action="store_true",
                    help="start the selected targets over instead of resuming them")
    ap.add_argument("--report", action="store_true",
                    help="print results.json as the markdown table of docs/reliability.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.report:
        report()
        return 0
    if a.worker:
        worker(a.worker, a.inputs, a.max_seconds, a.timeout, a.rss_limit_mb)
        return 0
    from fuzz.targets import TARGETS

    names = [n for n in (a.targets.split(",") if a.targets else TARGETS) if n]
    unknown = set(names) - set(TARGETS)
    if unknown:
        print(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
        return 2
    results = _load()
    if a.fresh:  # start the selected targets over (the others' records stay)
        for n in names:
            results.pop(n, None)
    todo = []
    for n in names:
        prev = results.get(n, {})
        owed = a.inputs - int(prev.get("inputs", 0)) if prev.get("target_inputs") == a.inputs \
            else a.inputs
        if owed > 0:
            todo.append((n, owed))
        else:
            print(f"{n:16} done before: {prev['inputs']:>9,} inputs (resume: skipped)")
    t0 = time.monotonic()
    deadline = t0 + a.max_seconds
    todo.sort(key=lambda item: _cost(results.get(item[0], {})), reverse=True)  # slowest first
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futs = {pool.submit(run_target, n, owed, deadline, a.timeout, a.rss_limit_mb): (n, owed)
                for n, owed in todo}
        for fut in concurrent.futures.as_completed(futs):
            n, owed = futs[fut]
            r = fut.result()
            prev = results.get(n, {}) if results.get(n, {}).get("target_inputs") == a.inputs \
                else {}
            total = int(prev.get("inputs", 0)) + int(r["inputs"])  # type: ignore[call-overload]
            secs = float(prev.get("seconds", 0)) + float(r["seconds"])  # type: ignore[arg-type]
            findings = sorted(set(prev.get("findings", [])) | set(r["findings"]))  # type: ignore[arg-type]
            results[n] = {"entry": TARGETS[n].entry, "target_inputs": a.inputs, "inputs": total,
                          "seconds": round(secs, 1), "inputs_per_s": round(total / secs) if secs
                          else 0, "findings": findings, "fatal": r["fatal"],
                          "corpus": r["corpus"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            on_disk = _load()  # another run may have recorded other targets meanwhile
            on_disk[n] = results[n]
            RESULTS.write_text(json.dumps(on_disk, indent=2, sort_keys=True) + "\n")
            print(f"{n:16} {total:>9,} inputs in {secs:8.0f}s ({results[n]['inputs_per_s']:>6}/s)"
                  f"  findings: {', '.join(findings) or 'none'}"
                  + (f"  FATAL: {r['fatal']}" if r["fatal"] else ""), flush=True)
    total_s = time.monotonic() - t0
    print(f"total wall time {total_s:.0f}s; results in {RESULTS}")
    short = [n for n in names if int(results.get(n, {}).get("inputs", 0)) < a.inputs]
    bad = [n for n in names
           if results.get(n, {}).get("findings") or results.get(n, {}).get("fatal")]
    if short:
        print(f"short of {a.inputs:,} inputs (run again to resume): {', '.join(short)}")
    if bad:
        print(f"targets with findings (see tests/fuzz/findings/): {', '.join(bad)}")
    return 1 if bad or short else 0


if __name__ == "__main__":
    sys.exit(main())
