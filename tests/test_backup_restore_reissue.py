"""After a CA restore, services re-authenticate (docs/recovery.md, "Restores"): every identity
with a live certificate in the restored records gets a new one from the restored CA, every
old serial is denied (and its renewals), and a second run changes nothing."""

from __future__ import annotations

import datetime as dt
import json

from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue
from modelseal.pki.identity import Identity
from modelseal.pki.verify import identity_of
from modelseal.recovery.reissue import INDEX, folder_name, reissue_and_revoke
from tests.conftest import Env

TD = "example.org"


def test_live_certificates_are_reissued_and_the_old_serials_revoked(env: Env) -> None:
    ca = pki_ca.init_ca(env.svc, TD)
    trainer = Identity.of(TD, "prod", "service", "trainer")
    alice = Identity.of(TD, "prod", "user", "alice")
    gone = Identity.of(TD, "prod", "service", "gone")
    t1 = issue.issue(env.svc, trainer, ca=ca)
    renewed = issue.issue(env.svc, trainer, ca=ca, renewed_from=t1.cert.serial_number)
    a1 = issue.issue(env.svc, alice, ca=ca)
    g1 = issue.issue(env.svc, gone, ca=ca)
    issue.revoke(env.svc, g1.cert.serial_number, "left", ca=ca)  # revoked before the backup: not re-issued
    out = env.work / "reissued"
    got = reissue_and_revoke(env.svc, out, "backup-1")
    assert got["issued"] == 2 and got["identities"] == 2
    old = {t1.serial, renewed.serial, a1.serial}
    assert set(got["revoked"]) == old
    listed = denylist.load(ca.folder)
    assert all(listed.revoked(denylist.parse_serial(s)) for s in old)
    index = json.loads((out / INDEX).read_text())
    assert index["backup"] == "backup-1" and set(index["identities"]) == {trainer.uri, alice.uri}
    for who in (trainer, alice):
        entry = index["identities"][who.uri]
        assert entry["folder"] == folder_name(who.uri)
        certs = issue.read_chain(out / entry["folder"])
        assert not listed.revoked(certs[0].serial_number)
        now = dt.datetime.now(dt.UTC)
        assert identity_of(certs, [ca.root], now, listed, trust_domain=TD) == who
    # Run again (an interrupted restore re-run): nothing more is issued or taken for old.
    again = reissue_and_revoke(env.svc, out, "backup-1")
    assert again["issued"] == 0 and again["revoked"] == []
    assert not denylist.load(ca.folder).revoked(issue.read_chain(out / folder_name(alice.uri))[0].serial_number)
