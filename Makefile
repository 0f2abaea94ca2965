# ambient: two commands for a newcomer, `make demo` and `make test`.
# Both run scripts/bootstrap.sh first, which installs whatever is missing (idempotent).
PY := .venv/bin/python
PROTOS := $(shell find ambient/api -name '*.proto' 2>/dev/null)

.PHONY: bootstrap demo test proto lint down clean bench bench-controlplane manifests fuzz soak

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m ambient.cli demo

down: bootstrap
	$(PY) -m ambient.cli down

test: bootstrap
	$(PY) -m pytest -q -p no:cacheprovider tests

# Regenerate the Python modules for our .proto files (committed; tests/unit/test_proto_gen.py
# checks that the committed output matches the sources).
proto: bootstrap
	$(PY) -m ambient.api.generate

# Regenerate daemonset/*.yaml from ambient/install (tests/unit/test_install_render.py checks
# that the committed files match the renderer).
manifests: bootstrap
	$(PY) -m ambient.install.files daemonset

# Data-path benchmark: ambient vs direct and peer proxies (Envoy HBONE, stunnel, haproxy) on the
# local cluster; writes perf/results/latest.{json,png}.  BENCH_ARGS="--modes ambient --quick".
bench: bootstrap
	$(PY) -m perf.bench $(BENCH_ARGS)

# Control-plane translation at 10k pods / 1k services; writes perf/results/controlplane.json.
bench-controlplane: bootstrap
	$(PY) perf/bench_controlplane.py

# The long fuzz run: every parser of untrusted input, 1,000,000 inputs per target (atheris),
# both cores, resumable; writes tests/fuzz/results.json. FUZZ_ARGS="--inputs 100000" etc.
fuzz: bootstrap
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q 'atheris>=2.3'
	$(PY) tests/fuzz/run.py $(FUZZ_ARGS)

# The long load and soak run (tests/soak/run.py): 10k concurrent connections through one
# ztunnel, 1k new connections/s for 60 s, slow HBONE peers; writes tests/soak/results.json.
# SOAK_ARGS="--connections 2000 --seconds 20" etc.; the short versions run in `make test`.
soak: bootstrap
	$(PY) -m tests.soak.run $(SOAK_ARGS)

lint: bootstrap
	$(PY) -m ruff check .
	$(PY) -m mypy ambient ztunnel cni bpf controlplane waypoint perf

clean:
	rm -rf .venv build *.egg-info
