"""The request-filter extension hook: loading, ordering, and failures that stay per-request."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
from waypoint_l7_helpers import mkreq

from waypoint.examples.add_header import AddHeader
from waypoint.filters import (
    FilterLoadError,
    FilterResult,
    MutableHeaders,
    RequestFilter,
    load_filters,
    parse_filter_list,
    run_request_filters,
    run_response_filters,
)

EXAMPLE = "waypoint.examples.add_header:AddHeader"

TEST_FILTERS = textwrap.dedent('''
    from waypoint.filters import FilterResult

    class Boom:
        name = "boom"
        def on_request(self, req, headers):
            raise RuntimeError("kaboom")

    class Wrong:
        name = "wrong"
        def on_request(self, req, headers):
            return "continue"

    class Tag:
        name = "tag"
        def on_request(self, req, headers):
            headers.add("x-order", "tag")
            return FilterResult.CONTINUE
        def on_response(self, req, status, headers):
            raise ValueError("response hook broke")

    class NeedsArgs:
        name = "needs-args"
        def __init__(self, x):
            self.x = x
        def on_request(self, req, headers):
            return FilterResult.CONTINUE

    class NoName:
        def on_request(self, req, headers):
            return FilterResult.CONTINUE

    class NoHook:
        name = "no-hook"

    instance = Tag()
''')


@pytest.fixture
def filtmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"wp_test_filters_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(TEST_FILTERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_parse_filter_list() -> None:
    assert parse_filter_list(" a.b:C , ,d:E,") == ["a.b:C", "d:E"]
    assert parse_filter_list("") == []


def test_example_filter_loads_and_works() -> None:
    [f] = load_filters([EXAMPLE])
    assert isinstance(f, AddHeader) and isinstance(f, RequestFilter)
    raw = [("accept", "*/*")]
    headers = MutableHeaders(raw)
    assert run_request_filters([f], mkreq("/"), headers).is_continue
    assert raw == [("accept", "*/*"), ("x-ambient-filter", "add-header")]  # edited in place
    res = run_request_filters([f], mkreq("/", headers=(("x-ambient-block", "true"),)),
                              MutableHeaders())
    assert (res.respond_status, res.filter_name) == (403, "add-header")
    resp = MutableHeaders()
    assert run_response_filters([f], mkreq("/"), 200, resp) == []
    assert resp.get("X-Ambient-Filter") == "add-header"


def test_filters_run_in_order_until_one_answers(filtmod: str) -> None:
    fs = load_filters([f"{filtmod}:Tag", EXAMPLE, f"{filtmod}:Boom"])
    headers = MutableHeaders()
    res = run_request_filters(fs, mkreq("/", headers=(("x-ambient-block", "TRUE"),)), headers)
    assert res.respond_status == 403 and res.filter_name == "add-header"
    assert headers.get_all("x-order") == ["tag"]  # the first ran; Boom never did


def test_a_raising_filter_fails_the_request_not_the_caller(
    filtmod: str, caplog: pytest.LogCaptureFixture
) -> None:
    fs = load_filters([f"{filtmod}:Boom"])
    with caplog.at_level(logging.ERROR, logger="waypoint.filters"):
        res = run_request_filters(fs, mkreq("/x"), MutableHeaders())
    assert (res.respond_status, res.filter_name) == (500, "boom")
    assert "boom" in caplog.text and "kaboom" in caplog.text
    fs = load_filters([f"{filtmod}:Wrong"])
    res = run_request_filters(fs, mkreq("/x"), MutableHeaders())
    assert (res.respond_status, res.filter_name) == (500, "wrong")


def test_a_raising_response_hook_is_reported(filtmod: str) -> None:
    fs = load_filters([f"{filtmod}:Tag", EXAMPLE])
    headers = MutableHeaders()
    assert run_response_filters(fs, mkreq("/"), 200, headers) == ["tag"]
    assert headers.get("x-ambient-filter") == "add-header"  # the others still ran


def test_module_level_instance_can_be_named(filtmod: str) -> None:
    [f] = load_filters([f"{filtmod}:instance"])
    assert f.name == "tag"


@pytest.mark.parametrize(
    "entry,fragment",
    [
        ("no_colon", "not of the form"),
        (":Cls", "not of the form"),
        ("mod:", "not of the form"),
        ("wp_no_such_module_xyz:F", "cannot import module"),
        ("{mod}:Missing", "has no 'Missing'"),
        ("{mod}:NeedsArgs", "must take no arguments"),
        ("{mod}:NoName", "non-empty string attribute 'name'"),
        ("{mod}:NoHook", "no on_request"),
    ],
)
def test_load_errors_name_the_entry(filtmod: str, entry: str, fragment: str) -> None:
    entry = entry.replace("{mod}", filtmod)
    with pytest.raises(FilterLoadError) as ei:
        load_filters([EXAMPLE, entry])
    assert repr(entry) in str(ei.value) and fragment in str(ei.value)


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(FilterLoadError, match="two filters are named 'add-header'"):
        load_filters([EXAMPLE, EXAMPLE])


def test_mutable_headers_and_results_validate() -> None:
    h = MutableHeaders()
    h.add("X-A", "1")
    h.add("x-a", "2")
    h.set("x-b", "3")
    assert list(h) == [("x-a", "1"), ("x-a", "2"), ("x-b", "3")]
    assert h.get("X-A") == "1" and h.get_all("x-a") == ["1", "2"] and len(h) == 3
    h.remove("X-A")
    assert list(h) == [("x-b", "3")]
    for name, value in (("x-c", "a\r\nb"), (":path", "/"), ("", "v")):
        with pytest.raises(ValueError):
            h.add(name, value)
    with pytest.raises(ValueError):
        FilterResult.respond(99)
    assert FilterResult.CONTINUE.is_continue
