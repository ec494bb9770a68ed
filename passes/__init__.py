"""qprep\x27s rewriting passes, one per file."""
