"""Layer 8: the signed compliance evidence bundle an auditor checks (docs/evidence.md): what it
gathers, the control index, the JSON and self-contained HTML, the signature and its check.
docs/architecture.md names the modules.
"""
