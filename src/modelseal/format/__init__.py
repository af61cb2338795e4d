"""Layer 1, the sealed format (docs/format.md): header codec, key schedule, chunked AEAD stream,
ciphertext sources, sealed files and the sealed-folder manifest.

It knows nothing of key providers, policies, signatures or the CLI: unwrapping a data key is a
callable handed in. Imports only ``modelseal.errors`` and ``modelseal.util``.
"""
