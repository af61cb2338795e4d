"""``modelseal scan tls://HOST:PORT``: an endpoint against Mozilla's modern TLS profile, its
certificate's lifetime, and its pins.

Two looks at the endpoint:

- **sslyze**, an external tool in a Python of its own (its dependencies conflict with ours):
  ``--python``/``[scan] sslyze_python``, ``MODELSEAL_SSLYZE_PYTHON``, else the interpreter of
  the ``sslyze`` script on ``PATH``. It runs ``python -m sslyze --mozilla_config=modern``
  through ``DRIVER``, which records the compliance checker's issues as JSON (the CLI only
  prints them) and, with a client certificate, works around sslyze bug #693 (its SSL 2.0
  probe cannot load a certificate chain: it presents the leaf alone, and the server refuses
  SSL 2.0 before asking for one). Issues map to findings: TLS versions and vulnerabilities to
  ``tls-weak-protocol``; cipher suites, curves, key exchange and certificate key or signature
  types to ``tls-weak-cipher``; the certificate lifespan to ``tls-certificate-lifetime``; a
  certificate that does not validate against the CA file to ``tls-pin-mismatch``.
- **our own handshake** (stdlib ``ssl``, TLS 1.3, with the client certificate folder when one
  is configured): the leaf's lifetime (more than 398 days, expired, or less than a third of it
  left: ``tls-certificate-lifetime``, with the days left) and the pins configured for this
  endpoint (``[scan.pins]``, else ``[registry]`` when it is a registry endpoint, or ``--pin``),
  checked as ``registry.transport`` checks them: a CA certificate that signed the leaf must
  match a pin (``tls-pin-mismatch``). No pins configured: a note.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from modelseal.errors import CertificateError, ModelsealError
from modelseal.keys.service import printable
from modelseal.pki.pins import check_pins
from modelseal.registry import settings
from modelseal.registry.reference import Endpoint, parse_endpoint
from modelseal.registry.tlsclient import client_context, held_issuers, issuer_chain, verified_chain
from modelseal.telemetry.scanmodel import (
    CRITICAL,
    TLS_CERTIFICATE_LIFETIME,
    TLS_PIN_MISMATCH,
    TLS_WEAK_CIPHER,
    TLS_WEAK_PROTOCOL,
    Finding,
    ScanReport,
)

SSLYZE_ENV = "MODELSEAL_SSLYZE_PYTHON"
MAX_LIFETIME_DAYS = 398  # the CA/Browser Forum's limit for a TLS server certificate
SSLYZE_TIMEOUT = 600.0
_KINDS = {
    "tls_versions": TLS_WEAK_PROTOCOL,
    "ciphersuites": TLS_WEAK_CIPHER,
    "ciphers": TLS_WEAK_CIPHER,
    "ecdh_param_size": TLS_WEAK_CIPHER,
    "dh_param_size": TLS_WEAK_CIPHER,
    "tls_curves": TLS_WEAK_CIPHER,
    "certificate_curves": TLS_WEAK_CIPHER,
    "certificate_types": TLS_WEAK_CIPHER,
    "certificate_signatures": TLS_WEAK_CIPHER,
    "rsa_key_size": TLS_WEAK_CIPHER,
    "maximum_certificate_lifespan": TLS_CERTIFICATE_LIFETIME,
    "certificate_path_validation": TLS_PIN_MISMATCH,
}

DRIVER = r"""
import json, runpy, sys
from pathlib import Path
result, leaf = Path(sys.argv.pop(1)), sys.argv.pop(1)
from sslyze.mozilla_tls_profile import tls_config_checker as checker
original = checker.check_server_against_tls_configuration

def check(server_scan_result, tls_config_to_check_against):
    try:
        original(server_scan_result=server_scan_result, tls_config_to_check_against=tls_config_to_check_against)
    except checker.ServerNotCompliantWithTlsConfiguration as e:
        result.write_text(json.dumps({"issues": {str(k): str(v) for k, v in e.issues.items()}}))
        raise
    except checker.ServerScanResultIncomplete as e:
        result.write_text(json.dumps({"incomplete": str(e)}))
        raise
    result.write_text(json.dumps({"issues": {}}))

checker.check_server_against_tls_configuration = check
if leaf != "-":
    from nassl import legacy_ssl_client, ssl_client
    use_key = legacy_ssl_client.LegacySslClient._use_private_key

    def leaf_only(self, chain, key, key_type, password):
        if self._ssl_version == ssl_client.OpenSslVersionEnum.SSLV2:
            chain = Path(leaf)
        return use_key(self, chain, key, key_type, password)

    legacy_ssl_client.LegacySslClient._use_private_key = leaf_only
sys.argv[0] = "sslyze"
runpy.run_module("sslyze", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class TlsOptions:
    tls_dir: Path | None
    pins: dict[str, list[str]]  # "HOST:PORT" -> pins
    extra_pins: list[str]  # --pin: for every endpoint
    sslyze_python: str | None

    @classmethod
    def of(cls, opts: Any, table: dict[str, Any]) -> TlsOptions:
        """From ``telemetry.scan.ScanOptions`` and ``[scan]``, then ``[registry]``."""
        tls_dir = opts.tls_dir or (Path(table["tls_dir"]) if table.get("tls_dir") else None)
        pins: dict[str, list[str]] = {str(parse_endpoint(k)): list(v) for k, v in table.get("pins", {}).items()}
        try:
            reg = settings.load()
        except ModelsealError:
            reg = None
        if reg is not None:
            tls_dir = tls_dir or reg.tls_dir
            for ep in reg.endpoints:
                pins.setdefault(str(ep), list(reg.pins))
        python = opts.sslyze_python or os.environ.get(SSLYZE_ENV) or table.get("sslyze_python")
        return cls(tls_dir, pins, list(opts.pins), python)


def scan_tls(target: str, report: ScanReport, opts: TlsOptions) -> None:
    ep = parse_endpoint(target.removeprefix("tls://").rstrip("/"))
    where = f"tls://{ep}"
    report.files += 1
    _handshake(ep, where, report, opts)
    _sslyze(ep, where, report, opts)


# -- our own handshake: certificate lifetime and pins ---------------------------------------


def _context(opts: TlsOptions) -> ssl.SSLContext:
    if opts.tls_dir is not None:
        return client_context(opts.tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    # Inspection only, nothing is sent and no trust is decided here: the lifetime is read, and
    # pins are checked over the chain by registry.tlsclient.issuer_chain and pki.pins.check_pins.
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _handshake(ep: Endpoint, where: str, report: ScanReport, opts: TlsOptions) -> None:
    try:
        ctx = _context(opts)
        with (
            socket.create_connection((ep.host, ep.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=ep.host) as sock,
        ):
            der = sock.getpeercert(binary_form=True) or b""
            try:
                chain = verified_chain(sock) or _unverified_chain(sock)
            except ValueError:
                chain = []  # a certificate that does not parse: the leaf's own load says so below
    except ssl.SSLCertVerificationError as e:
        detail = f"the certificate does not verify against {opts.tls_dir}/ca.pem ({printable(str(e.verify_message))})"
        report.add(Finding(TLS_PIN_MISMATCH, where, detail, CRITICAL))
        return
    except (OSError, ssl.SSLError) as e:
        report.error(where, f"no TLS handshake ({printable(str(e))[:160]})")
        return
    if not der:
        report.error(where, "the server presented no certificate")
        return
    try:
        leaf = x509.load_der_x509_certificate(der)
        _lifetime(leaf, where, report)
    except ValueError as e:  # OpenSSL took it, cryptography cannot parse it: an interceptor's, maybe
        detail = f"the server's certificate does not parse ({printable(str(e))[:160]}): lifetime and pins not checked"
        report.add(Finding(TLS_PIN_MISMATCH, where, detail, CRITICAL))
        return
    pins = [*opts.pins.get(str(ep), []), *opts.extra_pins]
    if not pins:
        report.note(f"{where}: no pins configured for it ([scan.pins], [registry] pins or --pin): pins not checked")
        return
    try:
        held = held_issuers(opts.tls_dir) if opts.tls_dir is not None else []
        links = issuer_chain(leaf, [*chain[1:], *held])
        check_pins(pins, links)
    except CertificateError as e:
        report.add(Finding(TLS_PIN_MISMATCH, where, printable(str(e))[:200], CRITICAL))
    except ValueError as e:
        detail = f"a certificate of the chain does not parse ({printable(str(e))[:160]}): pins not checked"
        report.add(Finding(TLS_PIN_MISMATCH, where, detail, CRITICAL))


def _unverified_chain(sock: ssl.SSLSocket) -> list[x509.Certificate]:
    get = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if get is None:
        return []
    return [x509.load_der_x509_certificate(c.public_bytes(ssl._ssl.ENCODING_DER)) for c in get()]  # type: ignore[attr-defined]


def _lifetime(leaf: x509.Certificate, where: str, report: ScanReport, now: datetime | None = None) -> None:
    t = now or datetime.now(UTC)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    life, left = (end - start).total_seconds() / 86400, (end - t).total_seconds() / 86400
    detail = f"lifetime {life:.0f} days, {left:.1f} days left (until {end:%Y-%m-%dT%H:%M:%SZ})"
    if left <= 0:
        report.add(Finding(TLS_CERTIFICATE_LIFETIME, where, f"expired: {detail}", CRITICAL))
    elif life > MAX_LIFETIME_DAYS:
        report.add(Finding(TLS_CERTIFICATE_LIFETIME, where, f"longer than {MAX_LIFETIME_DAYS} days: {detail}"))
    elif left < life / 3:
        report.add(Finding(TLS_CERTIFICATE_LIFETIME, where, f"less than a third of its lifetime left: {detail}"))


# -- sslyze -----------------------------------------------------------------------------------


def sslyze_python(configured: str | None) -> str | None:
    """The Python that runs sslyze: the configured one, else the interpreter of the
    ``sslyze`` script on PATH (its ``#!`` line); None if there is none."""
    if configured:
        return configured
    script = shutil.which("sslyze")
    if script is None:
        return None
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    python = first[2:].strip().decode("utf-8", "replace") if first.startswith(b"#!") else ""
    return python if python and os.path.isabs(python) and os.access(python, os.X_OK) else None


def _sslyze(ep: Endpoint, where: str, report: ScanReport, opts: TlsOptions) -> None:
    python = sslyze_python(opts.sslyze_python)
    if python is None:
        report.error(where, f"no sslyze: set {SSLYZE_ENV} or [scan] sslyze_python, or put sslyze on PATH")
        return
    with tempfile.TemporaryDirectory(prefix="modelseal-scan-") as tmp:
        out, result = Path(tmp) / "sslyze.json", Path(tmp) / "compliance.json"
        args = [python, "-c", DRIVER, str(result), _leaf(opts.tls_dir, Path(tmp)), "--mozilla_config=modern"]
        if opts.tls_dir is not None:
            d = opts.tls_dir
            args += [
                "--cert",
                str(d / "cert.pem"),
                "--key",
                str(d / "key.pem"),
                "--certinfo_ca_file",
                str(d / "ca.pem"),
            ]
        args += ["--json_out", str(out), str(ep)]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=SSLYZE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            report.error(where, f"sslyze did not run ({printable(str(e))[:160]})")
            return
        try:
            verdict = json.loads(result.read_text())
        except (OSError, ValueError):
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            report.error(where, f"sslyze gave no verdict (exit {done.returncode}: {printable(last[0])[:160]})")
            return
    if "incomplete" in verdict or not isinstance(verdict.get("issues"), dict):
        report.error(where, "sslyze could not complete its scan (the endpoint refused some of its probes)")
        return
    for criterion, text in sorted(verdict["issues"].items()):
        kind = _KINDS.get(str(criterion), TLS_WEAK_PROTOCOL)
        if kind == TLS_PIN_MISMATCH and opts.tls_dir is None:
            # sslyze's own public trust stores, not ours: a private CA fails them, which says
            # nothing of interception (the pins, when configured, are checked by our handshake)
            report.note(
                f"{where}: not validated against a CA of ours (no --tls-dir); public trust stores: {text}"[:300]
            )
            continue
        report.add(Finding(kind, where, f"Mozilla modern: {printable(str(criterion))}: {printable(str(text))[:240]}"))


def _leaf(tls_dir: Path | None, tmp: Path) -> str:
    """The leaf alone of the client certificate (public) for the driver's SSL 2.0 workaround;
    "-" without a client certificate."""
    if tls_dir is None:
        return "-"
    try:
        pem = (tls_dir / "cert.pem").read_text()
    except OSError:
        return "-"
    end = "-----END CERTIFICATE-----"
    if end not in pem:
        return "-"
    leaf = tmp / "leaf.pem"
    leaf.write_text(pem[: pem.index(end) + len(end)] + "\n")
    return str(leaf)


__all__ = ["DRIVER", "MAX_LIFETIME_DAYS", "SSLYZE_ENV", "TlsOptions", "scan_tls", "sslyze_python"]
