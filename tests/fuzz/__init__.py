"""qprep's fuzzer: a program generator, an oracle, and campaigns (see tests/test_fuzz.py)."""
