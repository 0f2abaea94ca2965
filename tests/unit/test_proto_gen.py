"""The committed generated protobuf modules must match a fresh run of ``ambient.api.generate``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ambient.api import generate

pytest.importorskip("grpc_tools")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protogen")
    generate.generate(out)
    return out


def test_generated_set_matches_sources(fresh: Path) -> None:
    expected = generate.expected_outputs()
    assert expected, "no .proto sources found"
    assert generate.generated_files(fresh) == expected
    # Nothing stale or missing in the repository either.
    assert generate.generated_files(generate.REPO_ROOT) == expected


@pytest.mark.parametrize("rel", generate.expected_outputs(), ids=str)
def test_committed_file_is_up_to_date(fresh: Path, rel: Path) -> None:
    committed = generate.REPO_ROOT / rel
    assert committed.is_file(), f"{rel} missing: run `make proto`"
    assert committed.read_bytes() == (fresh / rel).read_bytes(), f"{rel} stale: run `make proto`"


def test_generation_is_deterministic(fresh: Path, tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for rel in generate.expected_outputs():
        assert (tmp_path / rel).read_bytes() == (fresh / rel).read_bytes(), rel


def test_generate_removes_stale_outputs(tmp_path: Path) -> None:
    stale = tmp_path / generate.API_REL / "istio" / "gone_pb2.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("# stale\n")
    generate.generate(tmp_path)
    assert not stale.exists()
    assert generate.generated_files(tmp_path) == generate.expected_outputs()


def test_cli_out_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == len(generate.expected_outputs())
    assert generate.generated_files(tmp_path) == generate.expected_outputs()


def test_only_service_files_get_grpc_stubs() -> None:
    grpc_files = {p.name for p in generate.expected_outputs() if p.name.endswith("_grpc.py")}
    assert grpc_files == {"ca_pb2_grpc.py", "ads_pb2_grpc.py"}


@pytest.mark.parametrize(
    "rel", [p for p in generate.expected_outputs() if p.suffix == ".py"], ids=str
)
def test_generated_python_modules_import(rel: Path) -> None:
    importlib.import_module(".".join(rel.with_suffix("").parts))
