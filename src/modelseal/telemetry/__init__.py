"""Layer 6 (beside the loaders), reserved: Prometheus metrics, anomaly detection and the scan for
unprotected artifacts (the monitoring issue).

Nothing here yet; docs/architecture.md says what may import what.
"""
