"""Layer 4 (beside signing): the internal CA, SPIFFE-style identities, certificate issue,
renewal, revocation and pins (docs/pki.md). Its private keys are sealed under a KEK of
``keys`` (layer 3).

``identity`` (the ``spiffe://DOMAIN/ENV/KIND/NAME`` grammar), ``store`` (the files under
``$MODELSEAL_HOME/ca/`` and the sealing of CA keys), ``ca`` (init, load, intermediate
roll-over), ``issue`` (leaf issue, renew, revoke, the certificate folder), ``verify``
(``identity_of`` for the server and client), ``pins`` (RFC 7469-style pin sets) and
``denylist`` (revoked serials), ``backend`` (the ``Issuer`` seam and the ``[pki]``
settings), ``transit_pki`` (OpenBao's PKI engine as issuer) and ``renewal`` (a client
renewing its own certificate over mTLS).
"""
