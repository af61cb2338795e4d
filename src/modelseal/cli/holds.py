"""``modelseal access holds``, ``access hold`` and ``access release``: the holds a detector's
response (or an officer) put on an identity, a key or a source (docs/access.md, "Holds").

They talk to ``modelseal serve`` through ``registry.apiclient.ApiClient`` like the other
``access`` commands (``cli.access``); placing and releasing need a security officer's
step-up code, read by the ``read_otp`` that ``cli.access`` passes in (the terminal, or one
line of stdin; never argv). ``access release --local --data DIR`` is the way out when no
officer can reach the API (every officer held): it releases on the server's governance
database directly, like ``access bootstrap``, and writes the ``hold-release`` event to this
host's audit log. A hold is printed as one line whose state is the second column and whose
free text (reasons, who) is quoted, so no reason can pass for another state.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from modelseal.cli.common import escape, fmt_time
from modelseal.errors import GovernanceError
from modelseal.governance.holds import HOLD_KINDS
from modelseal.keys.service import KeyService

MAX_PAGES = 1000  # 500 holds each: more than an environment may have active


def _when(t: object) -> str:
    return fmt_time(float(t)) if isinstance(t, int | float) and not isinstance(t, bool) else "-"


def _quoted(value: object) -> str:
    """Untrusted text as one quoted string: escaped, its quotes too."""
    return '"' + escape("" if value is None else value).replace('"', '\\"') + '"'


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    from modelseal.registry.apiclient import ApiClient

    with ApiClient.from_settings(getattr(args, "server", None)) as api:
        out: dict[str, Any] = api.call(method, path, body)
        return out


def _print_hold(h: dict[str, Any]) -> None:
    state = "active" if h.get("active") is True else "released"
    line = f"{escape(h.get('id'))}  {state}  {escape(h.get('kind'))} {escape(h.get('subject'))}"
    line += f"  placed {_when(h.get('placed_at'))} by {_quoted(h.get('placed_by'))}  reason {_quoted(h.get('reason'))}"
    seen = h.get("detections")
    if isinstance(seen, int) and not isinstance(seen, bool) and seen > 1:
        line += f"  detected {seen} times, last {_when(h.get('last_seen'))}"
    if state == "released":
        line += f"  released {_when(h.get('released_at'))} by {_quoted(h.get('released_by'))}"
        line += f"  reason {_quoted(h.get('release_reason'))}"
    print(line)


def cmd_holds(args: argparse.Namespace, svc: KeyService) -> int:
    rows: list[Any] = []
    after: object = None
    for _ in range(MAX_PAGES):  # every page: the server answers at most 500 holds at a time
        query = "?all=1" if args.all else ""
        if isinstance(after, str):
            query += ("&" if query else "?") + "after=" + quote(after, safe="")
        doc = _call(args, "GET", "holds" + query)
        page = doc.get("holds")
        rows += page if isinstance(page, list) else []
        after = doc.get("next")
        if not isinstance(after, str):
            break
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for h in rows:
        if isinstance(h, dict):
            _print_hold(h)
    return 0


def cmd_hold(args: argparse.Namespace, svc: KeyService, read_otp: Callable[[], str]) -> int:
    body = {"kind": args.kind, "subject": args.subject, "reason": args.reason, "otp": read_otp()}
    _print_hold(_call(args, "POST", "holds", body))  # an officer's identity: 202, ApprovalRequired (exit 18)
    return 0


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _release_local(args: argparse.Namespace, svc: KeyService) -> None:
    from modelseal.governance.holds import HoldStore, release_event
    from modelseal.governance.store import open_target

    if not args.data:
        raise GovernanceError("access release --local needs the server's --data DIR (and --db URL if it has one)")
    store = HoldStore.open(open_target(Path(args.data), args.db))
    try:
        gone = store.release(args.id, f"local:{_local_user()}", args.reason)
    finally:
        store.close()
    svc.sink.emit(release_event(gone))
    _print_hold(gone.to_json())


def cmd_release(args: argparse.Namespace, svc: KeyService, read_otp: Callable[[], str]) -> int:
    if args.local:
        _release_local(args, svc)
        return 0
    body = {"reason": args.reason, "otp": read_otp()}
    _print_hold(_call(args, "POST", f"holds/{quote(args.id, safe='')}/release", body))
    return 0


def add_holds(s: Any, server: Callable[[argparse.ArgumentParser], None], read_otp: Callable[[], str]) -> None:
    """The hold commands under ``modelseal access`` (``s``: its subparsers; ``server`` adds
    ``--server``; ``read_otp`` reads a step-up code)."""
    ls = s.add_parser("holds", help="the holds in force: identities, keys and sources pending review")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--all", action="store_true", help="released ones too")
    ls.set_defaults(fn=cmd_holds)
    h = s.add_parser("hold", help="hold an identity, a key (its unwraps) or a source pending review (MFA)")
    h.add_argument("kind", choices=HOLD_KINDS)
    h.add_argument(
        "subject", help="an exact identity URI, a broker key name, or an IPv4 address/network or IPv6 network"
    )
    h.add_argument("--reason", required=True)
    h.set_defaults(fn=functools.partial(cmd_hold, read_otp=read_otp))
    r = s.add_parser("release", help="release a hold after review (a security officer, MFA)")
    r.add_argument("id", metavar="HOLD_ID")
    r.add_argument("--reason", required=True)
    r.add_argument("--local", action="store_true", help="on the server's database, no server (every officer held)")
    r.add_argument("--data", metavar="DIR", help="with --local: the server's --data")
    r.add_argument("--db", metavar="URL", help="with --local: the server's --db")
    r.set_defaults(fn=functools.partial(cmd_release, read_otp=read_otp))
    for q in (ls, h, r):
        server(q)


__all__ = ["add_holds"]
