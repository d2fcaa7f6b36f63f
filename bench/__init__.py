"""fastpatch benchmarks (pytest-benchmark) and their report: ``pytest bench/ --benchmark-only``,
``python -m bench.report RESULTS.json``. See docs/benchmarks.md."""
