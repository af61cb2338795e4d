// The in-browser check of an RFC 9162 inclusion proof (server/console_audit.py's proof page).
// Recomputes the leaf hash SHA-256(0x00 || event) of the event bytes, then the root from the
// leaf and the audit path (RFC 9162 section 2.1.3.2), with WebCrypto, and compares it with the
// signed tree head's root shown on the page: "verified in this browser" only on a match.
"use strict";
(function () {
  const HEX = /^(?:[0-9a-f]{2})*$/;

  function toHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function fromHex(text) {
    if (!HEX.test(text)) throw new Error("not hex");
    const out = new Uint8Array(text.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(2 * i, 2), 16);
    return out;
  }

  async function sha256(...parts) {
    const n = parts.reduce((a, p) => a + p.length, 0);
    const buf = new Uint8Array(n);
    let at = 0;
    for (const p of parts) { buf.set(p, at); at += p.length; }
    return new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  }

  const leafHash = (data) => sha256(Uint8Array.of(0), data);
  const nodeHash = (left, right) => sha256(Uint8Array.of(1), left, right);

  // RFC 9162 2.1.3.2; BigInt: a tree may have more than 2^32 entries.
  async function rootFromPath(index, size, leaf, path) {
    if (index < 0n || index >= size) return null;
    let fn = index, sn = size - 1n, r = leaf;
    for (const p of path) {
      if (sn === 0n) return null;
      if ((fn & 1n) === 1n || fn === sn) {
        r = await nodeHash(p, r);
        if ((fn & 1n) === 0n) {
          while (!((fn & 1n) === 1n || fn === 0n)) { fn >>= 1n; sn >>= 1n; }
        }
      } else {
        r = await nodeHash(r, p);
      }
      fn >>= 1n; sn >>= 1n;
    }
    return sn === 0n ? r : null;
  }

  async function check(section) {
    const out = section.querySelector('[data-testid="proof-browser"]');
    const shownRoot = document.querySelector('[data-testid="sth-root"]');
    let ok = false;
    try {
      const leaf = await leafHash(new TextEncoder().encode(section.dataset.body));
      const path = section.dataset.path ? section.dataset.path.split(" ").map(fromHex) : [];
      if (path.some((h) => h.length !== 32)) throw new Error("a path hash is not 32 bytes");
      const root = await rootFromPath(BigInt(section.dataset.index), BigInt(section.dataset.size), leaf, path);
      ok = toHex(leaf) === section.dataset.leaf && root !== null && shownRoot !== null &&
        toHex(root) === shownRoot.textContent.trim();
    } catch (e) {
      ok = false;
    }
    out.textContent = ok ? "verified in this browser" : "FAILED";
    out.className = ok ? "good" : "bad";
    out.dataset.result = ok ? "verified" : "failed";
    return ok;
  }

  window.modelsealProof = { check, leafHash, rootFromPath, fromHex, toHex };
  for (const section of document.querySelectorAll('[data-testid="proof"]')) check(section);
})();
