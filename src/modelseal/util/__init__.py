"""Base layer: crash-safe file output, safe folder walks, capped reads, and where host state lives.

Knows nothing of the sealed format, keys or signatures. Everything above may import it.
"""
