"""Parsers of the benchmark's load tools and /proc readers, on outputs recorded on this machine
(iperf3 3.12, wrk 4.1.0, h2load 1.52, Linux 6.x)."""

from __future__ import annotations

import json

import pytest

from perf.parse import (
    ToolOutputError,
    parse_h2load,
    parse_h2load_log,
    parse_iperf3,
    parse_wrk,
)
from perf.procstat import parse_stat_cpu_ticks, parse_status_kb

IPERF3_OK = json.dumps({
    "start": {"test_start": {"protocol": "TCP", "num_streams": 1, "duration": 1}},
    "intervals": [],
    "end": {
        "sum_sent": {"start": 0, "end": 1.000389, "seconds": 1.000389, "bytes": 2236088320,
                     "bits_per_second": 17881750559.032536, "retransmits": 5, "sender": True},
        "sum_received": {"start": 0, "end": 1.003353, "seconds": 1.003353,
                         "bytes": 2234777600, "bits_per_second": 17818475451.81008,
                         "sender": True},
    },
})
IPERF3_REFUSED = """{
\t"start":\t{
\t\t"connected":\t[],
\t\t"version":\t"iperf 3.12"
\t},
\t"intervals":\t[],
\t"end":\t{
\t},
\t"error":\t"unable to connect to server: Connection refused"
}"""

WRK_OK = """Running 1s test @ http://127.0.0.1/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.94ms    3.29ms  30.75ms   94.95%
    Req/Sec    70.04k    25.19k  134.76k    70.00%
  140213 requests in 1.02s, 20.06MB read
Requests/sec: 137315.51
Transfer/sec:     19.64MB
"""
WRK_ERRORS = """Running 2s test @ http://10.244.2.3:80/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   210.83us  480.33us   4.61ms   92.62%
    Req/Sec    26.73k     8.45k   36.30k    72.73%
  29260 requests in 1.10s, 4.05MB read
  Socket errors: connect 3, read 12, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  26604.98
Transfer/sec:      3.68MB
"""
WRK_REFUSED = "unable to connect to 127.0.0.1:9 Connection refused\n"

H2LOAD_OK = """starting benchmark...
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 998.00 req/s, 1.12MB/s
requests: 1996 total, 1996 started, 1996 done, 1996 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 1996 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 2.23MB (2343304) total, 216.36KB (221556) headers (space savings 0.00%), 1.95MB (2043904) data
                     min         max         mean         sd        +/- sd
time for request:        9us       416us        71us        56us    86.62%
"""  # noqa: E501 - recorded verbatim
H2LOAD_FAILED = """finished in 329us, 0.00 req/s, 0B/s
requests: 4 total, 0 started, 0 done, 0 succeeded, 4 failed, 4 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
"""
H2LOAD_LOG = ("1795805145161201\t200\t129\n1795805145161194\t200\t153\n"
              "1795805145161178\t503\t9000\n1795805145161170\t200\t1500\n\n")

# /proc/<pid>/stat of a process whose comm has a space and a parenthesis.
STAT = ("4242 (my proc) x) S 1 4242 4242 0 -1 4194560 2400 0 0 0 "
        "150 25 0 0 20 0 3 0 123456 300000000 20000 18446744073709551615 1 1 0 0 0 0 0 "
        "4096 0 0 0 0 17 1 0 0 0 0 0")
STATUS = "Name:\tpython3\nVmPeak:\t  300000 kB\nVmHWM:\t   61234 kB\nVmRSS:\t   50000 kB\n"


def test_iperf3_received_gbits() -> None:
    assert parse_iperf3(IPERF3_OK) == pytest.approx(17.818475, rel=1e-6)


@pytest.mark.parametrize("text, words", [
    (IPERF3_REFUSED, "Connection refused"),
    ("iperf3: error - unable to connect", "no JSON"),
    ('{"end": {}}', "sum_received"),
    ("[1, 2]", "unexpected JSON"),
])
def test_iperf3_failures_name_the_cause(text: str, words: str) -> None:
    with pytest.raises(ToolOutputError, match=words):
        parse_iperf3(text)


def test_wrk_clean_run() -> None:
    r = parse_wrk(WRK_OK)
    assert (r.requests, r.rps, r.socket_errors, r.bad_status) == (140213, 137315.51, 0, 0)


def test_wrk_counts_socket_errors_and_bad_statuses() -> None:
    r = parse_wrk(WRK_ERRORS)
    assert (r.requests, r.rps, r.socket_errors, r.bad_status) == (29260, 26604.98, 18, 7)


def test_wrk_without_summary_is_an_error() -> None:
    with pytest.raises(ToolOutputError, match="Connection refused"):
        parse_wrk(WRK_REFUSED)


def test_h2load_summary() -> None:
    s = parse_h2load(H2LOAD_OK)
    assert (s.total, s.succeeded, s.failed, s.errored, s.timeout, s.rps) == (
        1996, 1996, 0, 0, 0, 998.0)
    f = parse_h2load(H2LOAD_FAILED)
    assert (f.total, f.succeeded, f.failed, f.errored, f.rps) == (4, 0, 4, 4, 0.0)
    with pytest.raises(ToolOutputError):
        parse_h2load("starting benchmark...\n")


def test_h2load_log_keeps_2xx_latencies_in_ms() -> None:
    assert parse_h2load_log(H2LOAD_LOG) == [0.129, 0.153, 1.5]


@pytest.mark.parametrize("line", ["1\t200", "1\tOK\t12", "a b c"])
def test_h2load_log_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ToolOutputError, match="line 2"):
        parse_h2load_log("1\t200\t5\n" + line + "\n")


def test_proc_stat_cpu_ticks_after_comm_with_parens() -> None:
    assert parse_stat_cpu_ticks(STAT) == 175


def test_proc_status_kb() -> None:
    assert parse_status_kb(STATUS, "VmHWM") == 61234
    assert parse_status_kb(STATUS, "VmRSS") == 50000
    assert parse_status_kb(STATUS, "VmSwap") is None
