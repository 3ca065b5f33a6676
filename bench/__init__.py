"""Reproducible benchmarks of sectionchat against raw-websockets baselines (see docs/performance.md)."""
