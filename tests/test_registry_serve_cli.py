"""``modelseal serve``'s flags: the defaults the parser states (so that building it does not
import aiohttp) are the server's own, and a ``--db`` URL carrying a password is refused
(it would be visible in argv to every user of the host)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelseal.cli import serve as cli_serve
from modelseal.registry import policy
from modelseal.registry.service import Limits
from modelseal.registry.sqlmeta import open_meta
from modelseal.server import app, runner


def test_parser_defaults_are_the_servers() -> None:
    assert tuple(policy.POLICIES) == cli_serve.CONTENT_POLICIES
    assert cli_serve.CONTENT_POLICIES[0] == policy.SEALED_ONLY
    assert tuple(runner.RENEWAL_MODES) == cli_serve.RENEWAL_MODES
    assert cli_serve.GC_INTERVAL == app.GC_INTERVAL
    assert cli_serve.BODY_TIMEOUT == app.BODY_TIMEOUT
    assert Limits.link_grace == cli_serve.GC_GRACE


def test_the_cli_does_not_import_aiohttp_for_other_commands() -> None:
    code = "import sys, modelseal.cli; modelseal.cli.build_parser(); print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "url",
    ["postgresql://ms:s3cret@127.0.0.1/reg", "postgres://ms@127.0.0.1/reg?password=s3cret"],
)
def test_a_db_url_with_a_password_is_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not carry a password") as e:
        open_meta(url, tmp_path)
    assert "s3cret" not in str(e.value)
