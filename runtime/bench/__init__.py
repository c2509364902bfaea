"""Benchmarks and reports that run whole models: streaming under RAM caps, the trained miniature's report."""
