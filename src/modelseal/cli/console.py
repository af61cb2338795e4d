"""``modelseal console login``: a one-time sign-in link for the web console (docs/console.md).

It asks ``POST /modelseal/v1/console/login`` of ``modelseal serve --console`` through
``registry.apiclient.ApiClient`` (pinned mutual TLS: the caller's client certificate is the
identity the link signs in as) and prints the link, which opens a session in a browser
within 60 s, once. The link is the only secret this prints; it is never logged, and it
leaves the browser's address bar as soon as it is used.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelseal.cli.common import escape
from modelseal.errors import ConsoleError
from modelseal.keys.service import KeyService

LOGIN_PATH = "console/login"


def cmd_login(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.registry.apiclient import ApiClient

    with ApiClient.from_settings(args.server) as api:
        out = api.call("POST", LOGIN_PATH, {})
    url, who, expires = out.get("url"), out.get("identity"), out.get("expires")
    if not isinstance(url, str) or not url.startswith("https://") or "/ui/login?t=" not in url:
        raise ConsoleError("the server answered no sign-in link: is it running with --console?")
    if args.json:
        print(json.dumps({"url": url, "identity": who, "expires": expires}))
        return 0
    print(f"Open this link within 60 seconds to sign in as {escape(str(who))} (it works once):")
    print(escape(url))
    return 0


def add_console(sub: Any) -> None:
    p = sub.add_parser("console", help="the web console of modelseal serve --console (docs/console.md)")
    s = p.add_subparsers(dest="console_cmd", required=True)
    login = s.add_parser("login", help="print a one-time sign-in link (60 s) for your client certificate's identity")
    login.add_argument("--server", metavar="HOST:PORT", help="the server (default: [broker]/[registry])")
    login.add_argument("--json", action="store_true", help="print {url, identity, expires}")
    login.set_defaults(fn=cmd_login)


__all__ = ["add_console"]
