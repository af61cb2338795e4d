"""``POST /modelseal/v1/certificates/renew``: a caller renews its own certificate with the
one it presents (the client half is ``pki.renewal``).

The body is a PEM CSR (at most ``MAX_CSR`` bytes, P-256, its self-signature checked: proof
that the caller holds the new key). The new leaf names EXACTLY the identity of the caller's
verified certificate (``request[IDENTITY]``), the same DNS and IP names, and the presented
certificate's own lifetime, capped at the issuer's maximum (``pki.issue.renewal_terms``:
a short-lived certificate never renews itself into a longer one). The CSR's subject is
ignored; its SANs, if any, must be exactly those names: a CSR asking for anything else is
refused (403), never obeyed. The presented certificate must still be valid at the time of
the request (the identity middleware refuses an expired one too), and neither it nor any
certificate it was renewed from may be on the denylist (read afresh,
``pki.issue.check_lineage``); the new certificate is recorded as renewed from it, so
``cert revoke`` of any ancestor denies it too. The issue is audited with the caller as
actor. The request is decided first (``server.authz``: ``cert.renew`` on the caller's own
``Certificate``; the shipped policy permits it to every identity for itself). Signing runs
in a worker thread: the local CA unwraps its key, OpenBao is a request.

Errors are one-line OCI-style bodies: 400 a malformed CSR, 403 refused, 413 too large,
503 the issuer unreachable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelseal.errors import CertificateError, ModelsealError, PolicyDenied
from modelseal.governance.model import Resource
from modelseal.pki import issue
from modelseal.pki.backend import Issuer, Settings, Signed, csr_public_key, sans, sans_of, settings
from modelseal.pki.ca import utcnow
from modelseal.pki.identity import Identity
from modelseal.pki.renewal import CHAIN_TYPE, MAX_CSR, ROUTE
from modelseal.pki.verify import uri_identity
from modelseal.server import authz
from modelseal.server.identity import IDENTITY, peer_der

log = logging.getLogger("modelseal.server")


class BadCSR(CertificateError):
    """The request body is not one PEM CSR for a P-256 key."""


def parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    if len(body) > MAX_CSR:
        raise BadCSR(f"a CSR is at most {MAX_CSR} bytes")
    if body.count(b"-----BEGIN CERTIFICATE REQUEST-----") != 1:
        raise BadCSR("the body must be one PEM certificate signing request")
    try:
        csr = x509.load_pem_x509_csr(body)
    except ValueError:
        raise BadCSR("the body is not a PEM certificate signing request") from None
    try:
        csr_public_key(csr)
    except CertificateError as e:
        raise BadCSR(str(e)) from None
    return csr


def _names(names: list[x509.GeneralName]) -> list[tuple[str, str]]:
    return sorted((type(n).__name__, str(n.value)) for n in names)


def _terms(
    issuer: Issuer, caller: Identity, leaf: x509.Certificate, csr: x509.CertificateSigningRequest, now: dt.datetime
) -> tuple[list[str], list[str], dt.timedelta, Settings]:
    if uri_identity(leaf) != caller:
        raise PolicyDenied("the presented certificate does not name the caller")  # the middleware's own reading
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise CertificateError("the presented certificate is not valid now: it cannot renew itself")
    issue.check_lineage(issuer.folder, leaf.serial_number)
    cfg = settings()
    dns, ips, ttl = issue.renewal_terms(leaf, cfg.max_ttl)
    asked = sans_of(csr)
    if asked and _names(asked) != _names(sans(caller, dns, ips)):
        raise PolicyDenied(f"the CSR names other identities or hosts than the caller's certificate ({caller})")
    return dns, ips, ttl, cfg


def renew_for(
    issuer: Issuer,
    caller: Identity,
    leaf_der: bytes,
    csr: x509.CertificateSigningRequest,
    now: dt.datetime | None = None,
) -> Signed:
    """Sign ``csr`` for ``caller``, whose presented leaf is ``leaf_der`` (see the module
    docstring). Every refusal and every issue is audited, the caller as actor. ``now`` is
    for tests only: given, the backend's answer is not path-validated (a back-dated CA)."""
    t = now or utcnow()
    try:
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
        except ValueError:
            raise CertificateError("the presented certificate does not parse") from None
        dns, ips, ttl, cfg = _terms(issuer, caller, leaf, csr, t)
    except ModelsealError as e:
        issuer.audit("cert-renew", type(e).__name__, None, caller.uri)
        raise
    return issue.sign_csr(
        issuer,
        caller,
        csr,
        dns=dns,
        ips=ips,
        ttl=ttl,
        now=now,
        config=cfg,
        op="cert-renew",
        actor=caller.uri,
        renewed_from=leaf.serial_number,
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message[:300]}]}, status=status)


def add_routes(app: web.Application, issuer: Issuer) -> None:
    """Add ``POST /modelseal/v1/certificates/renew`` to ``app`` (behind the identity middleware)."""

    async def renew(request: web.Request) -> web.Response:
        caller = request[IDENTITY]  # the middleware refused otherwise
        await authz.authorize(request, "cert.renew", Resource("Certificate", caller.uri, {"env": caller.env}))
        der = peer_der(request)
        if der is None:
            return _error(401, "UNAUTHORIZED", "a client certificate is required")
        if request.content_length is not None and request.content_length > MAX_CSR:
            return _error(413, "SIZE_INVALID", f"a CSR is at most {MAX_CSR} bytes")
        body = bytearray()
        while len(body) <= MAX_CSR:  # read() returns what has arrived: loop to EOF or the limit
            chunk = await request.content.read(MAX_CSR + 1 - len(body))
            if not chunk:
                break
            body += chunk
        try:
            csr = parse_csr(bytes(body))
            signed = await asyncio.get_running_loop().run_in_executor(None, renew_for, issuer, caller, der, csr)
        except BadCSR as e:
            return _error(400, "CSR_INVALID", str(e))
        except (CertificateError, PolicyDenied) as e:
            log.warning("renewal refused for %s: %s", caller, e)
            return _error(403, "DENIED", str(e))
        except ModelsealError as e:
            log.error("renewal failed for %s: %s", caller, e)
            return _error(503, "UNAVAILABLE", "the issuer is unavailable; retry later")
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [signed.cert, *signed.chain])
        log.info("renewed %s: serial %s", caller, signed.serial)
        return web.Response(body=pem, content_type=CHAIN_TYPE)

    app.router.add_post(ROUTE, renew)


__all__ = ["BadCSR", "add_routes", "parse_csr", "renew_for"]
