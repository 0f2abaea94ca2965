"""``ambientctl`` operator verbs end to end on recorded dumps (argument parsing, exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ambient.cli import main

DUMP = str(Path(__file__).resolve().parents[1] / "data" / "ztunnel_config_dump_node_b.json")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("alias", "header"), [
    ("w", "POD NAME"), ("workloads", "POD NAME"), ("svc", "SERVICE VIP"),
    ("pol", "POLICY NAME"), ("cert", "SERIAL NUMBER"),
])
def test_zc_aliases(capsys, alias: str, header: str) -> None:
    code, out, _ = run(capsys, "zc", alias, "-f", DUMP)
    assert code == 0 and header in out.splitlines()[0]


def test_zc_json_filtered_by_namespace_is_still_the_raw_section(capsys) -> None:
    code, out, _ = run(capsys, "ztunnel-config", "policies", "-f", DUMP, "-o", "json")
    assert code == 0 and {p["name"] for p in json.loads(out)} == {
        "istio_converted_static_strict", "db-allow-backend"}


def test_policy_explain_json_and_errors(capsys) -> None:
    code, out, _ = run(capsys, "policy", "explain", "shop/frontend", "10.96.0.20:5432",
                       "-f", DUMP, "-o", "json")
    assert code == 0
    (item,) = json.loads(out)
    assert item["decision"]["allowed"] is False
    assert item["destination"] == {"workload": "shop/db", "ip": "10.244.2.3", "port": 8080,
                                   "service": "shop/db", "servicePort": 5432}
    code, _, err = run(capsys, "policy", "explain", "shop/ghost", "shop/db:5432", "-f", DUMP)
    assert code == 2 and "is not a workload" in err


def test_unreadable_dump_and_unreachable_admin(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "zc", "w", "-f", str(tmp_path / "missing.json"))
    assert code == 1 and "cannot read config dump" in err
    code, _, err = run(capsys, "zc", "w", "--admin", "http://127.0.0.1:1")
    assert code == 1 and "not reachable" in err
    code, _, err = run(capsys, "zc", "w", "--node", "n1", "--run-dir", str(tmp_path))
    assert code == 1 and "no local cluster" in err


def test_version(capsys) -> None:
    code, out, _ = run(capsys, "version")
    assert code == 0 and out.startswith("client version: ")
