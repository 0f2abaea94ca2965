"""Regenerate the Python modules for the ``.proto`` files under ``ambient/api``.

Usage (from the repository root; ``make proto`` runs the first form)::

    python -m ambient.api.generate            # rewrite the committed modules in place
    python -m ambient.api.generate --out DIR  # write the same tree under DIR instead

How it works:

* Every ``*.proto`` below ``ambient/api`` is compiled with ``grpc_tools.protoc`` using the
  repository root as the only project include path (``-I <root>``) plus grpc_tools' bundled
  include directory for ``google/protobuf/*.proto``. Imports between our files are therefore
  written ``import "ambient/api/...";`` and the outputs are importable as
  ``ambient.api.<...>_pb2``.
* For each ``x.proto`` it writes ``x_pb2.py`` and ``x_pb2.pyi``; files that declare a
  ``service`` also get ``x_pb2_grpc.py``.
* Output paths mirror the source paths: with ``--out DIR`` the module for
  ``ambient/api/istio/workload/workload.proto`` lands in
  ``DIR/ambient/api/istio/workload/workload_pb2.py``. Generated files already present in the
  output tree that no longer correspond to a ``.proto`` are deleted first, so the result is
  exactly what the sources produce.
* Protos are passed in sorted order with paths relative to the root, so the output only
  depends on the sources and the grpcio-tools version (which pins protoc). Regenerating twice
  gives byte-identical files; ``tests/unit/test_proto_gen.py`` checks the committed modules
  against a fresh run.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
REPO_ROOT = API_DIR.parent.parent
API_REL = API_DIR.relative_to(REPO_ROOT)

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_SERVICE_RE = re.compile(r"^\s*service\s+\w+\s*\{", re.MULTILINE)


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """All ``.proto`` sources under ``ambient/api``, relative to ``root``, sorted."""
    return sorted(p.relative_to(root) for p in (root / API_REL).rglob("*.proto"))


def has_service(path: Path) -> bool:
    """Whether the proto file declares a gRPC service (and so needs ``_pb2_grpc.py``)."""
    text = re.sub(r"//[^\n]*", "", path.read_text(encoding="utf-8"))
    return bool(_SERVICE_RE.search(text))


def expected_outputs(root: Path = REPO_ROOT) -> list[Path]:
    """Relative paths of every generated file the sources should produce, sorted."""
    out: list[Path] = []
    for proto in proto_files(root):
        stem = proto.with_suffix("")
        out.append(stem.with_name(stem.name + "_pb2.py"))
        out.append(stem.with_name(stem.name + "_pb2.pyi"))
        if has_service(root / proto):
            out.append(stem.with_name(stem.name + "_pb2_grpc.py"))
    return sorted(out)


def generated_files(tree: Path) -> list[Path]:
    """Relative paths of generated-looking files under ``tree/ambient/api``, sorted."""
    base = tree / API_REL
    if not base.is_dir():
        return []
    return sorted(
        p.relative_to(tree)
        for p in base.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # imported lazily: only needed at generation time

    include = str(resources.files("grpc_tools") / "_proto")
    argv = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{include}", *args]
    rc = protoc.main(argv)
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}): {' '.join(argv)}")


def generate(out: Path | None = None) -> list[Path]:
    """Generate all modules into ``out`` (default: the repository root, i.e. in place).

    Returns the relative paths written.
    """
    dest = (out or REPO_ROOT).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for stale in generated_files(dest):
        (dest / stale).unlink()

    protos = proto_files()
    if not protos:
        return []
    sources = [str(REPO_ROOT / p) for p in protos]
    _protoc([f"--python_out={dest}", f"--pyi_out={dest}", *sources])
    services = [str(REPO_ROOT / p) for p in protos if has_service(REPO_ROOT / p)]
    if services:
        _protoc([f"--grpc_python_out={dest}", *services])

    written = generated_files(dest)
    expected = expected_outputs()
    if written != expected:
        raise RuntimeError(f"unexpected generator output: {written} != {expected}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ambient.api.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write into this directory (as a tree rooted like the repo) instead of in place",
    )
    ns = parser.parse_args(argv)
    written = generate(ns.out)
    dest = (ns.out or REPO_ROOT).resolve()
    for path in written:
        print(dest / path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
