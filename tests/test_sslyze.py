"""``modelseal serve`` against sslyze's Mozilla "modern" profile (issue 12, section 2).

sslyze (PyPI, in its own venv: ``tests.services.sslyze_python``) presents a client
certificate of the CA, trusts the CA's root for the certificate checks, and must find the
server compliant: TLS 1.3 only, its three TLS 1.3 suites, one ECDSA P-256 certificate, the
P-256 key exchange only, no vulnerability. Its JSON result is checked field by field too,
so a compliant verdict for the wrong reason would still fail.

One workaround, for a bug of sslyze's and not of the server: sslyze's legacy OpenSSL
(nassl, used only for the SSL 2.0 probe) cannot load a client certificate *chain* under its
SSLv2 method (``SSL_CTX_add0_chain_cert`` is not implemented by ``ssl2_ctx_ctrl``), so the
SSL 2.0 scan command crashes for every server that needs a chain from its clients
(nabla-c0d3/sslyze#693). ``WRAPPER`` runs ``python -m sslyze`` unchanged except that the
SSLv2 client presents the leaf alone. It never gets that far: the server refuses the SSL 2.0
ClientHello before any certificate is asked for, which is what the scan checks.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from modelseal.pki import ca as pki_ca
from tests.conftest import Env
from tests.services import sslyze_python
from tests.test_serve_tls import TD, make_dir, running

WRAPPER = """
import runpy, sys
from pathlib import Path
from nassl import legacy_ssl_client, ssl_client

leaf = Path(sys.argv.pop(1))
original = legacy_ssl_client.LegacySslClient._use_private_key

def use_private_key(self, chain, key, key_type, password):
    if self._ssl_version == ssl_client.OpenSslVersionEnum.SSLV2:
        chain = leaf
    return original(self, chain, key, key_type, password)

legacy_ssl_client.LegacySslClient._use_private_key = use_private_key
sys.argv[0] = "sslyze"
runpy.run_module("sslyze", run_name="__main__", alter_sys=True)
"""
MODERN_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


def _sslyze(port: int, client: Path, root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    pem = (client / "cert.pem").read_text()
    end = "-----END CERTIFICATE-----"
    leaf = client.parent / "sslyze-leaf.pem"
    leaf.write_text(pem[: pem.index(end) + len(end)] + "\n")
    return subprocess.run(
        [
            str(sslyze_python()),
            "-c",
            WRAPPER,
            str(leaf),
            "--mozilla_config=modern",
            "--cert",
            str(client / "cert.pem"),
            "--key",
            str(client / "key.pem"),
            "--certinfo_ca_file",
            str(root),
            "--json_out",
            str(out),
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _result(doc: dict[str, Any], command: str) -> dict[str, Any]:
    attempt = doc["server_scan_results"][0]["scan_result"][command]
    assert attempt["status"] == "COMPLETED", (command, attempt.get("error_reason"), attempt.get("error_trace"))
    result: dict[str, Any] = attempt["result"]
    return result


def test_serve_passes_mozilla_modern_with_a_client_certificate(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    client = make_dir(env, env.work / "scanner", "service", "sslyze")
    with running(env, tls_dir) as server:
        out = env.work / "sslyze.json"
        done = _sslyze(server.port, client, tls_dir / "ca.pem", out)
    report = done.stdout + done.stderr
    assert f"127.0.0.1:{server.port}: OK - Compliant." in report and "Not compliant" not in report, report
    assert done.returncode == 0, report
    doc = json.loads(out.read_text())
    assert doc["server_scan_results"][0]["scan_status"] == "COMPLETED"
    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites"):
        assert not _result(doc, old)["is_tls_version_supported"], old
    for old in ("tls_1_1_cipher_suites", "tls_1_2_cipher_suites"):
        assert not _result(doc, old)["is_tls_version_supported"], old
    tls13 = _result(doc, "tls_1_3_cipher_suites")
    assert tls13["is_tls_version_supported"]
    accepted = {c["cipher_suite"]["name"] for c in tls13["accepted_cipher_suites"]}
    assert accepted and accepted <= MODERN_SUITES, accepted
    curves = {c["name"] for c in _result(doc, "elliptic_curves")["supported_curves"]}
    assert curves == {"secp256r1"}, curves
    deployments = _result(doc, "certificate_info")["certificate_deployments"]
    assert len(deployments) == 1
    leaf = deployments[0]["received_certificate_chain"][0]
    assert leaf["public_key"]["algorithm"] == "ECPublicKey", leaf["public_key"]
    assert leaf["public_key"]["ec_curve_name"] == "secp256r1" and leaf["public_key"]["key_size"] == 256
    assert "OK - Certificate is trusted" in report  # by the supplied CA file, the CA's root
