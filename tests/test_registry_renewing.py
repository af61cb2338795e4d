"""The registry client renews its own certificate over its pinned connection (issue 12
section 1): against ``modelseal serve --issue-certificates`` a due certificate is replaced
by one of the same identity before the transfer; against a server without the endpoint
the transfer goes on with the old certificate and a warning."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from modelseal.pki import issue
from modelseal.pki.identity import Identity
from modelseal.pki.verify import uri_identity
from modelseal.registry import renewing
from tests.conftest import Env
from tests.push_pull_helpers import TD, make_pki, modelseal_serve, transport


def _due_client(env: Env, folder: Path) -> int:
    """A client folder whose 5-minute certificate began 4 minutes ago: past two thirds."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4)
    issued = issue.issue(env.svc, Identity.of(TD, "prod", "service", "trainer"), now=past, ttl=dt.timedelta(minutes=5))
    issue.write_dir(issued, folder, force=True)
    return int(issued.cert.serial_number)


def test_a_due_client_certificate_is_renewed_through_the_pinned_connection(env: Env) -> None:
    p = make_pki(env)
    old = _due_client(env, p.client_dir)
    with modelseal_serve(env.work, p.server_dir, p.server_dir, "--issue-certificates", "--workers", "1") as port:
        t = transport(p, port)
        got = renewing.renew_if_due(t)
        assert got is not None
        leaf = issue.read_chain(p.client_dir)[0]
        assert leaf.serial_number != old and leaf.serial_number == got.cert.serial_number
        assert uri_identity(leaf) == Identity.of(TD, "prod", "service", "trainer")
        # the presented certificate's lifetime is kept (capped), not the issuer's 24 h default
        assert dt.timedelta(minutes=4) < leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=1)
        assert (p.client_dir / "key.pem").stat().st_mode & 0o777 == 0o600
        assert renewing.renew_if_due(t) is None  # young again: nothing sent
        assert t.request("GET", "/v2/").status == 200  # the new certificate is presented
        t.close()


def test_without_the_endpoint_the_old_certificate_stays_and_a_warning_says_so(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    p = make_pki(env)
    old = _due_client(env, p.client_dir)
    with modelseal_serve(env.work, p.server_dir, p.server_dir, "--workers", "1") as port:
        t = transport(p, port)
        with caplog.at_level(logging.WARNING, logger="modelseal.registry"):
            assert renewing.renew_if_due(t) is None
        assert "not renewed" in caplog.text and "404" in caplog.text
        assert issue.read_chain(p.client_dir)[0].serial_number == old
        assert t.request("GET", "/v2/").status == 200
        t.close()


def test_a_young_certificate_sends_nothing(env: Env) -> None:
    p = make_pki(env)
    t = transport(p, 1)  # nothing listens on port 1: a request would fail
    assert renewing.renew_if_due(t) is None
