"""Fuzz harnesses shared by the property tests (``tests/unit/test_fuzz_*.py``) and the long
run (``tests/fuzz/run.py``, ``make fuzz``)."""
