"""Benchmarks of flwr-byzantine (scripts run with ``python -m benchmarks.<name>``)."""
