"""Example waypoint request filter: tag requests and responses, and refuse a marked request.

Enable it with ``WAYPOINT_FILTERS=waypoint.examples.add_header:AddHeader``.  It adds
``x-ambient-filter: add-header`` to every request it forwards and to every response, and
answers 403 itself when the request carries ``x-ambient-block: true`` - a custom check in
four lines.  It keeps no state and does no I/O, as every filter should.
"""

from __future__ import annotations

from waypoint.filters import FilterResult, MutableHeaders
from waypoint.l7request import Request

HEADER = "x-ambient-filter"


class AddHeader:
    name = "add-header"

    def on_request(self, req: Request, headers: MutableHeaders) -> FilterResult:
        if (req.header("x-ambient-block") or "").lower() == "true":
            return FilterResult.respond(403, b"blocked by the add-header example filter\n",
                                        [("content-type", "text/plain")])
        headers.set(HEADER, self.name)
        return FilterResult.CONTINUE

    def on_response(self, req: Request, status: int, headers: MutableHeaders) -> None:
        headers.add(HEADER, self.name)
