"""The ``modelseal`` command line: a thin shell over the recipes in ``modelseal.recipes``.

One module per command group (``keys``, ``artifacts``, ``signing``, ``audit``, ``agent``, ``pki``, ``serve``,
``registry``); this one
builds the parser and turns every error into one line on stderr and a documented exit
code (``modelseal.errors``, docs/cli.md); no traceback unless ``MODELSEAL_DEBUG=1``.
Progress goes to stderr, only when it is a terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from modelseal.cli import (
    access,
    agent,
    artifacts,
    audit,
    backup,
    console,
    controls,
    evidence,
    incident,
    keys,
    metrics,
    monitor,
    pki,
    policy,
    registry,
    scan,
    serve,
    signing,
)
from modelseal.cli.common import escape
from modelseal.errors import ModelsealError
from modelseal.keys.service import KeyService
from modelseal.util import hardening


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelseal", description="Encrypt and govern ML model artifacts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    # The order of ``modelseal --help``.
    keys.add_init(sub)
    keys.add_key(sub)
    artifacts.add_seal(sub)
    artifacts.add_unseal(sub)
    signing.register(sub)
    artifacts.add_inspect(sub)
    artifacts.add_rewrap(sub)
    keys.add_rotate(sub)
    keys.add_recovery(sub)
    agent.add_agent(sub)
    audit.add_audit(sub)
    artifacts.add_reencrypt(sub)
    pki.add_ca(sub)
    pki.add_cert(sub)
    serve.add_serve(sub)
    registry.add_push(sub)
    registry.add_pull(sub)
    access.add_access(sub)
    access.add_approvals(sub)
    access.add_mfa(sub)
    policy.add_policy(sub)
    scan.add_scan(sub)
    metrics.add_metrics(sub)
    monitor.add_alerts(sub)
    monitor.add_events(sub)
    controls.add_controls(sub)
    backup.add_backup(sub)
    incident.add_incident(sub)
    evidence.add_evidence(sub)
    console.add_console(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    hardening.harden_cli()  # no core file of a process that holds keys and plaintext
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args, KeyService()))
    except ModelsealError as e:
        # Messages quote paths, names and fields read from artifacts: one line, escaped.
        print(f"modelseal: error: {escape(e, backslash=False)}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:
        print(f"modelseal: error: {escape(e, backslash=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelseal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MODELSEAL_DEBUG") == "1":
            raise
        print(f"modelseal: internal error ({type(e).__name__}); set MODELSEAL_DEBUG=1 for details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
