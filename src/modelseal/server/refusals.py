"""The audit events of refusals the single-event detectors read (``telemetry.probes``; docs/controls.md).

Two refusals are otherwise visible only as a status code: a push the ``sealed-only`` content
policy refused (``registry.policy``: a plaintext model, pickle, an unknown blob, a manifest
with a non-sealed layer) and a step-up code presented a second time (``governance.mfa``:
"already used", "used for another request"). Each is written here, through the decider's
queued sink (``server.auditwriter``), with the caller as actor and its address as source:

- ``AuditEvent("content-refused", "push Repository:NAME", "deny:sealed-only")``;
- ``AuditEvent("mfa-replay", "mfa:totp ACTION", "deny:replay")``.

Neither event says more than the refusal's kind: the refused bytes, the code and the
reason text stay out of the log. A server without a decider writes nothing (it refuses
every request anyway).
"""

from __future__ import annotations

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.errors import GovernanceError, RegistryRefused
from modelseal.governance.mfa import REPLAYED
from modelseal.server import authz
from modelseal.server.identity import IDENTITY

CONTENT_REFUSED = "content-refused"
MFA_REPLAY = "mfa-replay"
# registry.policy's refusals of content all start so (its ``_denied``); a test pushes one.
_SEALED_ONLY = "content policy sealed-only"


def _emit(request: web.Request, operation: str, key: str, result: str) -> None:
    decider = request.app.get(authz.AUTHZ)
    ident = request.get(IDENTITY)
    if decider is None or ident is None:
        return
    source = authz.request_source(request)
    decider.sink.emit(AuditEvent(operation, key, result, actor=ident.uri, source=source))


def content_refused(request: web.Request, name: str, error: RegistryRefused) -> None:
    """Audit ``error`` when it is the sealed-only content policy refusing a push to ``name``."""
    if error.status == 403 and request.method in ("POST", "PUT", "PATCH") and str(error).startswith(_SEALED_ONLY):
        _emit(request, CONTENT_REFUSED, f"push Repository:{name}", "deny:sealed-only")


def mfa_refused(request: web.Request, action: str, error: GovernanceError) -> None:
    """Audit a step-up code ``governance.mfa`` refused as presented before (a replay)."""
    if str(error) in REPLAYED:
        _emit(request, MFA_REPLAY, f"mfa:totp {action}", "deny:replay")


__all__ = ["CONTENT_REFUSED", "MFA_REPLAY", "content_refused", "mfa_refused"]
