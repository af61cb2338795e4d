"""Layer 4, signing: signers (PEM, Transit, PKCS#11), DSSE envelopes, what a signature commits to,
signature files, trust policy and revocation lists, keyless verification, OpenSSF model-signing.

Verification needs no data key. Uses the format (layer 1) to hash sealed bytes and the providers'
connections (layer 3) for Transit and PKCS#11 signers; knows nothing of recipes, loaders or the CLI.
"""
