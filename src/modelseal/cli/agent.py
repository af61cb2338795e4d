"""The ``modelseal agent`` command: start an agent, or ask a running one for its status,
to lock, unlock or stop (docs/keys.md, "The agent").

Thin: parse, call ``keys.agent_server.start`` or ``keys.agent_client``, print. Starting
prints the ``MODELSEAL_AGENT_SOCK=...; export MODELSEAL_AGENT_SOCK;`` lines of
``ssh-agent -s`` for ``eval "$(modelseal agent)"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from modelseal.keys import keystore
from modelseal.keys.agent import DEFAULT_TTL
from modelseal.keys.agent_client import PID_ENV, SOCK_ENV, AgentClient
from modelseal.keys.service import KeyService

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_ttl(text: str) -> float:
    """``90s``, ``30m``, ``8h``, ``1d`` or plain seconds."""
    try:
        value = float(text[:-1]) * _UNITS[text[-1]] if text[-1:] in _UNITS else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ttl takes a duration like 90s, 30m, 8h or 1d, got {text!r}") from None
    if not value == value or value < 1:  # NaN too
        raise argparse.ArgumentTypeError("--ttl must be at least one second")
    return value


def _left(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _client(args: argparse.Namespace) -> AgentClient:
    path = args.socket or os.environ.get(SOCK_ENV)
    if not path:
        raise ValueError(f'no agent: set {SOCK_ENV} (eval "$(modelseal agent)") or give --socket')
    return AgentClient(path)


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        shown = {k: status.get(k) for k in ("unlocked", "expires_in", "keystore", "pid", "keys")}
        print(json.dumps(shown, indent=2, sort_keys=True))
    elif status.get("unlocked"):
        left = float(status.get("expires_in") or 0.0)
        print(
            f"unlocked: {status.get('keys')} key(s) of {status.get('keystore')!s}, dropped in {_left(left)} "
            f"(agent pid {status.get('pid')})"
        )
    else:
        print(f"locked: no keys held for {status.get('keystore')!s} (agent pid {status.get('pid')})")


def cmd_agent(args: argparse.Namespace, svc: KeyService) -> int:
    if args.status:
        status = _client(args).status()
        _print_status(status, args.json)
        return 0 if status.get("unlocked") else 1
    if args.lock:
        was = _client(args).lock().get("was_unlocked")
        print("keys dropped" if was else "the agent held no keys")
        return 0
    if args.unlock:
        client = _client(args)
        _print_status(client.unlock(keystore.read_passphrase()), args.json)
        return 0
    if args.stop:
        pid = _client(args).stop().get("pid")
        print(f"unset {SOCK_ENV};\nunset {PID_ENV};\necho Agent pid {pid} killed;")
        return 0
    from modelseal.keys.agent_server import start

    def announce(path: Path, pid: int) -> None:
        quoted = shlex.quote(str(path))
        print(f"{SOCK_ENV}={quoted}; export {SOCK_ENV};\n{PID_ENV}={pid}; export {PID_ENV};\necho Agent pid {pid};")
        sys.stdout.flush()

    start(socket_path=args.socket, ttl=args.ttl, foreground=args.foreground, announce=announce)
    return 0


def add_agent(sub: Any) -> None:
    a = sub.add_parser(
        "agent",
        help="hold the unlocked keystore for a shell session (like ssh-agent)",
        description=(
            "Start an agent that holds the unlocked local keystore for --ttl behind a Unix socket, "
            f'and print the lines for eval "$(modelseal agent)". Commands with {SOCK_ENV} set use it: '
            "no passphrase, no scrypt. Key lifecycle commands still ask for the passphrase."
        ),
    )
    a.add_argument("--ttl", type=parse_ttl, default=DEFAULT_TTL, help="drop the keys after this long (default 1h)")
    a.add_argument("--socket", metavar="PATH", help="listen here (its folder must be this user's, mode 700)")
    a.add_argument("--foreground", action="store_true", help="do not fork; stop with Ctrl-C or SIGTERM")
    a.add_argument("--json", action="store_true", help="--status and --unlock as JSON")
    act = a.add_mutually_exclusive_group()
    act.add_argument("--status", action="store_true", help="ask the agent whether it holds keys (exit 1 if not)")
    act.add_argument("--lock", action="store_true", help="make the agent drop and zero its keys")
    act.add_argument("--unlock", action="store_true", help="unlock the agent again (MODELSEAL_PASSPHRASE or a prompt)")
    act.add_argument("--stop", "--kill", dest="stop", action="store_true", help="stop the agent")
    a.set_defaults(fn=cmd_agent)


__all__ = ["add_agent", "cmd_agent", "parse_ttl"]
