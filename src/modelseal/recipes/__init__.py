"""Layer 5, the recipes: seal, unseal, open, sign, rewrap, reencrypt, rotate, inspect.

The only layer that combines files, keys, signatures and the format. Safe defaults, no algorithm
knobs; ``modelseal.*`` re-exports the public ones. Knows nothing of loaders, the CLI or the server.
"""
