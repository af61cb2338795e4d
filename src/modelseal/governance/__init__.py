"""Layer 5 (beside the recipes), reserved: Cedar authorization, roles and bindings, separation of
duties, approvals, grants and exceptions (the governance issue).

Nothing here yet; docs/architecture.md says what may import what.
"""
