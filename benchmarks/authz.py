"""Authorization latency: ``Engine.decide`` with 1,000 bindings and 200 policies.

    python benchmarks/authz.py [--samples 20000] [--quick]

The policy set is the shipped one (20 policies) plus 180 per-repository permits of the kind
an operator writes (``resource == Repository::"teamN/model"``, principals matched by a
SPIFFE pattern with ``like``): 200 in all. The store holds 1,000 bindings in
``governance.store``'s shape (patterns with ``*`` segments, four roles, three
environments, grants among them); each request's principal carries the bindings matching
its identity, found the way ``GovStore.active_for`` does (a scan of the 1,000). The request
mix is pulls, pushes, unwraps, key rotations (denied: no role, or MFA) and artifact.push
standards checks, allowed and denied.

Reports p50/p99 (figures, not pass/fail; docs/benchmarks.md): the decision alone, the
decision plus the binding lookup, and the decision without the scope index (every
request evaluated against all 200 policies). Target: p99 under 1 ms. The server's whole
path (identity, cache, audit event, thread hop) is helper D's ``benchmarks/broker.py``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelseal.governance.cedar import Engine, PolicySet, default_policy
from modelseal.governance.model import Binding, Principal, Request, Resource

TD = "example.org"
ENVS = ("prod", "staging", "dev")
NOW = time.time()


def policies(n_repos: int) -> str:
    rules = [
        f'@id("repo-team{i}")\n'
        f'permit (principal, action in [Action::"pull", Action::"push"], resource == Repository::"team{i}/model")\n'
        f'when {{ principal.id like "spiffe://{TD}/*/service/team{i}-*" && principal.roles.contains("reader") }};'
        for i in range(n_repos)
    ]
    return default_policy().text + "\n" + "\n".join(rules)


def bindings(n: int, rng: random.Random) -> list[Binding]:
    out = []
    for i in range(n):
        env = ENVS[i % 3]
        team = i % 300
        kind = "grant" if i % 10 == 0 else "binding"
        role = ("reader", "publisher", "reader", "auditor")[i % 4] if i % 50 else "key-admin"
        pattern = f"spiffe://{TD}/{env}/service/team{team}-*" if i % 7 else f"spiffe://{TD}/{env}/user/user{i}"
        expires = NOW + (rng.uniform(3600, 7 * 86400) if kind == "grant" else 300 * 86400)
        out.append(Binding(f"b{i:04d}", pattern, role, env, expires, kind))
    return out


def requests(store: list[Binding], count: int, rng: random.Random) -> list[tuple[str, Request]]:
    out = []
    for _ in range(count):
        team = rng.randrange(300)
        env = ENVS[team % 3]  # where the team's bindings are
        ident = f"spiffe://{TD}/{env}/service/team{team}-trainer"
        action = rng.choice(["pull", "pull", "push", "key.unwrap", "key.rotate", "artifact.push"])
        if action in ("pull", "push"):
            repo = team if rng.random() < 0.8 else rng.randrange(300)  # mostly its own team's
            res = Resource("Repository", f"team{repo}/model", {"env": env})
        elif action == "artifact.push":
            schemes = rng.choice([["transit"], ["local"], ["transit", "local"]])
            attrs = {"env": env, "artifact_env": env, "schemes": schemes, "has_local": "local" in schemes}
            attrs |= {"signatures": rng.randrange(3), "threshold": 2, "has_trust": True, "kek_age_days": 100}
            res = Resource("Artifact", f"{rng.getrandbits(128):032x}", attrs)
        else:
            res = Resource("Key", f"{env}-kek", {"env": env})
        out.append((ident, Request(Principal(ident, env, "service", TD), action, res, {"artifact_env": env})))
    return out


def percentiles(ts: list[float]) -> tuple[float, float]:
    ts = sorted(ts)
    return ts[len(ts) // 2] * 1e6, ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e6


class WholeSet(PolicySet):
    """No scope index: every request against all 200 policies."""

    def selected(self, action: str, rtype: str, rid: str) -> object:
        cached = self.__dict__.get("_whole")
        if cached is None:
            cached = self.__dict__["_whole"] = self._build(self.ids)
        return cached


class BindingCache:
    """What ``GovStore.active_for`` does: the matching bindings per identity, found by one
    scan of the store the first time an identity is seen (and after every change), kept;
    the active ones filtered at each call."""

    def __init__(self, store: list[Binding]) -> None:
        self.store = store
        self.mine: dict[str, tuple[Binding, ...]] = {}
        self.scans: list[float] = []

    def active_for(self, ident: str) -> tuple[Binding, ...]:
        hit = self.mine.get(ident)
        if hit is None:
            t = time.perf_counter()
            hit = self.mine[ident] = tuple(b for b in self.store if b.matches(ident))
            self.scans.append(time.perf_counter() - t)
        return tuple(b for b in hit if b.active(NOW))


def measure(engine: Engine, reqs: list[tuple[str, Request]], cache: BindingCache) -> tuple[list[float], int]:
    ts = []
    allowed = 0
    for ident, r in reqs:
        t = time.perf_counter()
        p = r.principal
        bs = cache.active_for(ident)
        d = engine.decide(
            Request(Principal(p.identity, p.env, p.kind, p.trust_domain, bs), r.action, r.resource, r.context)
        )
        ts.append(time.perf_counter() - t)
        allowed += d.allowed
    return ts, allowed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    n = 2000 if a.quick else a.samples
    rng = random.Random(13)
    text = policies(200 - len(default_policy().ids))
    fast = Engine(PolicySet.parse(text, "bench.cedar"), now=lambda: NOW)
    slow = Engine(WholeSet.parse(text, "bench.cedar"), now=lambda: NOW)
    store = bindings(1000, rng)
    reqs = requests(store, n, rng)
    cache = BindingCache(store)
    for ident, _ in reqs:
        cache.active_for(ident)  # the store's per-identity cache, warm (as between binding changes)
    print(f"policies: {len(fast.policies.ids)}, bindings: {len(store)}, requests: {n}, identities: {len(cache.mine)}")
    t = time.perf_counter()
    measure(fast, reqs, cache)  # the steady state: the scope index and principal entities built
    print(f"first pass (builds the scope index lazily): {(time.perf_counter() - t) / n * 1e6:.0f} us mean")
    (fast_ts, allowed), (slow_ts, _) = measure(fast, reqs, cache), measure(slow, reqs[: n // 4], cache)
    rows = [("decide + bindings (scope index)", fast_ts), ("decide, all 200 policies per request", slow_ts)]
    print(f"{'':40} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for name, ts in rows:
        p50, p99 = percentiles(ts)
        print(f"{name:40} {p50:8.0f} {p99:8.0f} {statistics.fmean(ts) * 1e6:8.0f}")
    s50, s99 = percentiles(cache.scans)
    print(f"{'cold: scan of the 1,000 bindings':40} {s50:8.0f} {s99:8.0f}   (once per identity and change)")
    print(f"allowed: {allowed} of {n} (denials: no role, MFA, the standards)")
    p99 = percentiles(rows[0][1])[1]
    print(f"target p99 < 1000 us: {'met' if p99 < 1000 else 'NOT met'} ({p99:.0f} us)")


if __name__ == "__main__":
    main()
