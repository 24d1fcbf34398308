"""What Hypothesis reports for a test that fails on some examples: the shrunk minimum, derandomized
so the answer is the same on every run (the strategies' tests read shrinking through it)."""
import pytest
from hypothesis import HealthCheck, given, settings

FAST = settings(database=None, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def minimal(strategy, fails=lambda value: True, max_examples: int = 200):
    """The example Hypothesis reports for a test failing when ``fails``."""
    seen = []

    @settings(FAST, max_examples=max_examples, report_multiple_bugs=False)
    @given(strategy)
    def probe(value):
        if fails(value):
            seen.append(value)
            raise ValueError

    with pytest.raises(ValueError):
        probe()
    return seen[-1]
