"""Layer 3, keys: the key service (the one place that calls providers), the local keystore and its
recovery shares, config.toml (environments and projects), and the providers chosen by URI scheme.

Emits audit events (layer 2); knows nothing of signatures, recipes, loaders or the CLI.
"""
