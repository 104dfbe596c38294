"""Robustness evaluation: metrics, the attack protocol, reports and plots (``adpo eval``)."""
