"""Cedar decisions (``cedarpy``): the policy set and the engine that decides a ``Request``.

``PolicySet.parse`` checks the text once: every policy carries a unique ``@id``, every
forbid a one-line ``@reason``, no templates; ``@exception`` policies are split off into
``governance.exceptions``. The cedarpy handle is built from Cedar JSON keyed by our ids, so
Cedar's diagnostics name our policies. ``Engine.decide`` builds the two entities of a
request (the principal, with its roles for the resource's environment from its active
bindings, and the resource) and its context, and asks Cedar: default deny, forbid over
permit, and any evaluation error denies (fail closed: Cedar itself would skip an erroring
forbid). A denial by ``@standard`` forbids alone may be turned into an allow by an
exception. Pure: no I/O, the clock is injected. Policies are indexed by their scope
(action, resource type and id), so a request is evaluated against only the policies
that can match it; the result is the same as over the whole set.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import cedarpy

from modelseal.errors import GovernanceError
from modelseal.governance import exceptions as exc
from modelseal.governance.model import (
    ACTIONS,
    DATA_ROLES,
    KEY_ROLES,
    RESOURCE_TYPES,
    Decision,
    Principal,
    Request,
    identity_matches,
)

MAX_POLICY_TEXT = 1 << 20
MAX_POLICIES = 5000
MAX_INDEX = 4096  # scope-selected sub-sets kept; bounded by actions x types x pinned ids
PRINCIPAL_TYPE = "Principal"
# The ids of the shipped forbids other modules act on (server.authz, gov_api).
TWO_PERSON_ID = "gov-two-person"
MFA_ID = "gov-step-up-mfa"
BREAK_GLASS_ROLE = "break-glass"
_DATA_ROLES = frozenset((*DATA_ROLES, BREAK_GLASS_ROLE))  # break-glass has reader+publisher powers
_CONTEXT_DEFAULTS: dict[str, object] = {"mfa": False, "mfa_age": -1, "approved": False, "approvals": 0, "anomaly": 0}
_LONG = 1 << 63


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


@dataclass(frozen=True)
class PolicyInfo:
    id: str
    effect: str  # "permit" or "forbid"
    annotations: Mapping[str, str]
    body: Mapping[str, Any] = field(repr=False)

    @property
    def reason(self) -> str:
        return self.annotations.get("reason", "")

    @property
    def standard(self) -> str | None:
        return self.annotations.get("standard")


class PolicySet:
    """A parsed, checked policy text. ``digest`` is ``sha256:`` + hex of its UTF-8 bytes."""

    def __init__(self, text: str, source: str, infos: list[PolicyInfo], excs: list[exc.PolicyException]) -> None:
        self.text, self.source = text, source
        self.digest = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.policies: dict[str, PolicyInfo] = {p.id: p for p in infos}
        self.ids: tuple[str, ...] = tuple(p.id for p in infos)
        self.exceptions: tuple[exc.PolicyException, ...] = tuple(excs)
        self.standards: dict[str, tuple[str, ...]] = {}
        for p in infos:
            if p.standard:
                self.standards[p.standard] = (*self.standards.get(p.standard, ()), p.id)
        # Evaluated as permits, every one: Cedar then reports every satisfied policy, and
        # ``Engine`` applies Cedar's own rule (a forbid denies; else a permit allows; else
        # deny) to that set, in one evaluation instead of two for a denial.
        self._json = {p.id: json.dumps({p.id: {**p.body, "effect": "permit"}})[1:-1] for p in infos}
        self._pinned = {_pinned(p.body.get("resource", {})) for p in infos} - {None}
        self._index: OrderedDict[tuple[str, str, str | None], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._main: PolicySet | None = None
        self._build(self.ids)  # the whole set loads into Cedar, or parse refuses it

    @classmethod
    def parse(cls, text: str, source: str = "policy") -> PolicySet:
        if len(text.encode("utf-8")) > MAX_POLICY_TEXT:
            raise GovernanceError(f"{source}: a policy text is at most {MAX_POLICY_TEXT} bytes")
        try:
            doc = json.loads(cedarpy.policies_to_json_str(text))
        except ValueError as e:
            raise GovernanceError(f"{source} does not parse as Cedar: {_first_line(e)}") from None
        if doc.get("templates"):
            raise GovernanceError(f"{source}: templates (?principal, ?resource) are not accepted")
        bodies = list(doc.get("staticPolicies", {}).values())
        if len(bodies) > MAX_POLICIES:
            raise GovernanceError(f"{source}: at most {MAX_POLICIES} policies")
        infos, waivers, seen = [], [], set()
        for n, body in enumerate(bodies, 1):
            ann = body.get("annotations") or {}
            pid = ann.get("id")
            if not pid:
                raise GovernanceError(f'{source}: policy #{n} ({body.get("effect")}) has no @id("...")')
            exc.check_id(pid, f"{source}: policy #{n} @id")
            if pid in seen:
                raise GovernanceError(f"{source}: the @id {pid!r} is used twice")
            seen.add(pid)
            for k, v in ann.items():
                exc.check_text(v, f"{source}: @{k} of {pid!r}")
            info = PolicyInfo(pid, body.get("effect", ""), dict(ann), body)
            if "exception" in ann:
                waivers.append(info)
                continue
            if info.effect == "forbid" and not info.reason:
                raise GovernanceError(f'{source}: forbid {pid!r} has no @reason("..."): a denial must say why')
            if info.standard is not None:
                if info.effect != "forbid":
                    raise GovernanceError(f"{source}: @standard marks a forbid; {pid!r} is a permit")
                exc.check_id(info.standard, f"{source}: @standard of {pid!r}")
            infos.append(info)
        stds = {p.standard: p.id for p in infos if p.standard}
        excs = [exc.parse_exception(w.id, w.body, stds) for w in waivers]
        if len({e.id for e in excs}) != len(excs):
            raise GovernanceError(f"{source}: an @exception id is used twice")
        try:
            return cls(text, source, infos, excs)
        except ValueError as e:  # cedarpy refused the JSON it produced itself: a bug, still one line
            raise GovernanceError(f"{source} does not load into Cedar: {_first_line(e)}") from None

    def main_only(self) -> PolicySet:
        """The same policies without their exceptions (what the standards alone say)."""
        if not self.exceptions:
            return self
        if self._main is None:
            self._main = PolicySet(self.text, self.source, list(self.policies.values()), [])
        return self._main

    def _build(self, ids: Iterable[str]) -> Any:
        body = ",".join(self._json[i] for i in ids)
        return cedarpy.PolicySet.from_json_str(
            f'{{"staticPolicies": {{{body}}}, "templates": {{}}, "templateLinks": []}}'
        )

    def selected(self, action: str, rtype: str, rid: str) -> Any:
        """The handle of the policies whose scope can match (action, resource): the rest
        could neither be satisfied nor fail, so the decision is that of the whole set."""
        key = (action, rtype, rid if (rtype, rid) in self._pinned else None)
        with self._lock:
            hit = self._index.get(key)
            if hit is not None:
                self._index.move_to_end(key)
                return hit
        ids = [p.id for p in self.policies.values() if _can_match(p.body, action, rtype, rid)]
        handle = self._build(ids)
        with self._lock:
            self._index[key] = handle
            while len(self._index) > MAX_INDEX:
                self._index.popitem(last=False)
        return handle


def _pinned(scope: Mapping[str, Any]) -> tuple[str, str] | None:
    ent = scope.get("entity") or (scope.get("in") or {}).get("entity")
    return (str(ent.get("type")), str(ent.get("id"))) if isinstance(ent, dict) else None


def _failed(errors: list[str]) -> Decision:
    """Cedar skips a policy whose evaluation fails: for a forbid that would be an allow."""
    return Decision(False, (), f"denied: policy evaluation failed, fail closed ({str(errors[0])[:200]})")


def _can_match(body: Mapping[str, Any], action: str, rtype: str, rid: str) -> bool:
    """Whether the policy's action and resource scopes admit the request. No entity here
    has parents, so ``in E`` is ``== E``; an unknown scope form is kept (never dropped)."""
    a = body.get("action", {})
    if a.get("op") in ("==", "in"):
        ents = a.get("entities") or [a.get("entity")]
        if all(isinstance(e, dict) for e in ents) and not any(
            e.get("type") == "Action" and e.get("id") == action for e in ents
        ):
            return False
    r = body.get("resource", {})
    op = r.get("op")
    if op in ("==", "in") and isinstance(r.get("entity"), dict):
        return bool(r["entity"].get("type") == rtype and r["entity"].get("id") == rid)
    if op == "is":
        if r.get("entity_type") != rtype:
            return False
        pin = _pinned(r)
        return pin is None or pin == (rtype, rid)
    return True


@lru_cache(maxsize=1)
def default_policy() -> PolicySet:
    """The shipped policy set (``governance/policies/default.cedar``)."""
    text = resources.files("modelseal.governance").joinpath("policies/default.cedar").read_text("utf-8")
    return PolicySet.parse(text, "default.cedar")


def cedar_value(value: object, where: str, depth: int = 0) -> object:
    """A Python value as Cedar JSON data. Records may not use ``__`` keys (``__entity``,
    ``__extn`` would turn data into entity references or extension calls)."""
    if depth > 8:
        raise GovernanceError(f"{where}: nested too deep")
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        n = int(value)
        if not -_LONG <= n < _LONG:
            raise GovernanceError(f"{where}: out of Cedar's Long range")
        return n
    if isinstance(value, list | tuple | set | frozenset):
        items = [cedar_value(v, where, depth + 1) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, Mapping):
        return cedar_record(value, where, depth + 1)
    raise GovernanceError(f"{where}: {type(value).__name__} is not a Cedar value")


def cedar_record(values: Mapping[str, object], where: str, depth: int = 0) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in values.items():
        if not isinstance(k, str) or k.startswith("__"):
            raise GovernanceError(f"{where}: attribute name {str(k)[:40]!r} is refused")
        if v is None:
            continue
        if type(v) is str or type(v) is bool:  # the common case, without a call
            out[k] = v
        else:
            out[k] = cedar_value(v, f"{where}.{k}", depth)
    return out


@dataclass(frozen=True)
class Roles:
    """What a principal's active bindings give it."""

    roles: frozenset[str]  # for the resource's environment
    break_glass_only: frozenset[str]  # of those, the roles only a break-glass binding gives
    key_admin_envs: frozenset[str]
    data_envs: frozenset[str]


_matches = lru_cache(maxsize=16384)(identity_matches)  # the store matched them already: a cheap re-check


def roles_of(p: Principal, env: object, now: float) -> Roles:
    live = [b for b in p.bindings if b.active(now) and _matches(b.pattern, p.identity)]
    here = [b for b in live if b.env == env]
    normal = {b.role for b in here if b.kind != "break-glass"}
    glass = {b.role for b in here if b.kind == "break-glass"}
    return Roles(
        frozenset(normal | glass),
        frozenset(glass - normal),
        frozenset(b.env for b in live if b.role in KEY_ROLES),
        frozenset(b.env for b in live if b.role in _DATA_ROLES),
    )


def principal_attrs(p: Principal, r: Roles) -> dict[str, object]:
    return {
        "id": p.identity,
        "env": p.env,
        "kind": p.kind,
        "trust_domain": p.trust_domain,
        "roles": sorted(r.roles),
        "key_admin_envs": sorted(r.key_admin_envs),
        "data_envs": sorted(r.data_envs),
        "break_glass": bool(r.break_glass_only) or BREAK_GLASS_ROLE in r.roles,
    }


class Engine:
    """Decides requests under one ``PolicySet``. Thread-safe; no I/O. The principal's
    entity is parsed once per distinct set of attributes (bounded cache); each request
    adds only its resource."""

    def __init__(self, policies: PolicySet, now: Callable[[], float] = time.time) -> None:
        self.policies = policies
        self._now = now
        self._principals: OrderedDict[tuple[str, str, str, str, Roles], Any] = OrderedDict()
        self._lock = threading.Lock()

    def decide(self, req: Request) -> Decision:
        now = self._now()
        res = req.resource
        if req.action not in ACTIONS:
            return Decision(False, (), f"unknown action {req.action[:60]!r}: denied")
        if res.type not in RESOURCE_TYPES:
            return Decision(False, (), f"unknown resource type {res.type[:60]!r}: denied")
        roles = roles_of(req.principal, res.attrs.get("env"), now)
        try:
            request, entities = self._cedar_request(req, roles, now)
        except (GovernanceError, ValueError) as e:
            return Decision(False, (), f"denied: the request cannot be decided ({_first_line(e)})")
        r = cedarpy.is_authorized(request, self.policies.selected(req.action, res.type, res.id), entities)
        if r.diagnostics.errors:
            return _failed(r.diagnostics.errors)
        # Every policy was evaluated as a permit (PolicySet): ``reasons`` is every satisfied one.
        effect = self.policies.policies
        satisfied = sorted(r.diagnostics.reasons)
        permits = tuple(i for i in satisfied if effect[i].effect == "permit")
        forbids = tuple(i for i in satisfied if effect[i].effect != "permit")
        if not permits:  # the default deny; forbids matter only where something permits
            who = ", ".join(sorted(roles.roles)) or "no role"
            return Decision(False, (), f"no policy permits {req.action} on {res.type} for {who}")
        if not forbids:
            return self._allowed(permits, roles, "")
        return self._denied(forbids, permits, roles, request, entities, now)

    def _principal(self, p: Principal, roles: Roles) -> Any:
        key = (p.identity, p.env, p.kind, p.trust_domain, roles)
        with self._lock:
            hit = self._principals.get(key)
            if hit is not None:
                self._principals.move_to_end(key)
                return hit
        attrs = principal_attrs(p, roles)
        handle = cedarpy.Entities.from_json_str(
            json.dumps([{"uid": {"type": PRINCIPAL_TYPE, "id": p.identity}, "attrs": attrs, "parents": []}])
        )
        with self._lock:
            self._principals[key] = handle
            while len(self._principals) > MAX_INDEX:
                self._principals.popitem(last=False)
        return handle

    def _cedar_request(self, req: Request, roles: Roles, now: float) -> tuple[dict[str, Any], Any]:
        p, res = req.principal, req.resource
        context = {**_CONTEXT_DEFAULTS, "now": int(now), **dict(req.context)}
        rattrs = {**cedar_record(res.attrs, "resource"), "id": res.id}
        resource = json.dumps([{"uid": {"type": res.type, "id": res.id}, "attrs": rattrs, "parents": []}])
        request = {
            "principal": {"type": PRINCIPAL_TYPE, "id": p.identity},
            "action": {"type": "Action", "id": req.action},
            "resource": {"type": res.type, "id": res.id},
            "context": cedar_record(context, "context"),
        }
        return request, self._principal(p, roles).with_added_json_str(resource)

    def _allowed(self, permits: tuple[str, ...], roles: Roles, suffix: str, exception: str | None = None) -> Decision:
        used = {self.policies.policies[i].annotations.get("role") for i in permits if i in self.policies.policies}
        glass = bool(used & (roles.break_glass_only | {BREAK_GLASS_ROLE}))
        why = f"allowed by {', '.join(permits)}{suffix}" + (" (break-glass)" if glass else "")
        return Decision(True, permits, why, exception=exception, break_glass=glass)

    def _forbid_text(self, forbids: tuple[str, ...]) -> str:
        parts = [f"{i} ({self.policies.policies[i].reason})" for i in forbids if i in self.policies.policies]
        return "denied by " + "; ".join(parts)

    def _denied(
        self,
        forbids: tuple[str, ...],
        permits: tuple[str, ...],
        roles: Roles,
        request: dict[str, Any],
        entities: Any,
        now: float,
    ) -> Decision:
        """Denied by ``forbids`` although ``permits`` match: an exception may waive the
        forbids if every one of them is a ``@standard``."""
        why = self._forbid_text(forbids)
        stds = [self.policies.policies[i].standard for i in forbids]
        if not self.policies.exceptions or any(s is None for s in stds):
            return Decision(False, forbids, why)
        waived = exc.consult(self.policies.exceptions, frozenset(s for s in stds if s), request, entities, now)
        expired = tuple(e.id for e in waived.expired)
        late = "".join(f"; exception {e.id} expired at {e.expires_text}" for e in waived.expired)
        e = waived.live
        if e is None:
            return Decision(False, forbids, why + late, expired=expired)
        note = f"; exception {e.id} waives {', '.join(sorted(e.waives))} (owner {e.owner}, expires {e.expires_text})"
        d = self._allowed((*permits, e.id), roles, note + late, exception=e.id)
        return Decision(d.allowed, d.policies, d.reason, d.exception, expired, d.break_glass)


__all__ = [
    "BREAK_GLASS_ROLE",
    "MFA_ID",
    "TWO_PERSON_ID",
    "Engine",
    "PolicyInfo",
    "PolicySet",
    "Roles",
    "cedar_record",
    "cedar_value",
    "default_policy",
    "principal_attrs",
    "roles_of",
]
