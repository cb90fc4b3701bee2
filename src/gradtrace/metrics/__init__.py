"""Metrics: pure functions of arrays (no model, no files), so that evaluation runners, reports and benchmarks
share one definition of each. `stats`: bootstrap and paired confidence intervals."""
