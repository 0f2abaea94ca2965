"""Benchmarks of the mesh: ``python -m perf.bench`` (``make bench``) compares the data path
with direct traffic and with peer proxies; ``perf/bench_controlplane.py`` measures the
control plane's translation.  See perf/README.md."""
