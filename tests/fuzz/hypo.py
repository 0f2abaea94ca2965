"""Hypothesis settings shared by the fuzz property tests.

``make test`` runs a modest number of examples per property (the whole fuzz portion stays
well under a minute); ``FUZZ_EXAMPLES=5000`` runs more locally.  The deadline bounds each
input (a hang is a failure) and is generous so a busy machine does not make it flaky.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, deadline=5000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
