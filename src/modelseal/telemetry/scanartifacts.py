"""One file of a scan (``modelseal scan``, docs/scan.md): what its first bytes say it is
(``sniff``), and for a sealed file what its header says: damaged recipient slots, KEK
versions that are all disabled or past their cryptoperiod (``scankeys``), and signatures
that are missing, untrusted or revoked (``scansig``). Headers only: no key is used, no
chunk is read.

A target (a folder, a bucket, a repository) hands each file in as a ``Blob`` (a location,
a size and bounded reads at an offset) with a ``Neighbours`` callback giving, for a sealed
file or folder manifest, the artifact's location and its signature file's bytes. Nothing
read from a file chooses what else is read: the reads are at offsets the format fixes (the
prefix, the slots, a zip's end), each bounded.

Slots (docs/format.md, section 4): the newest well-formed slot is the active one. A damaged
slot beside a well-formed one is the inactive slot: a finding (a torn rewrap; the next
rewrap rewrites it). No well-formed slot at all is a damaged active slot: critical, the
artifact no longer opens. A slot is judged by its structure alone; its MAC needs the key. A
sealed magic whose header is damaged, truncated or of a format this release does not read
is a critical ``damaged-slot`` too (damaged, newer, or another file disguised behind the
magic: the bytes after it are sniffed and a plaintext model there is named), never a silent
error.

A file that is not sealed is first checked for a backup in clear (``scanbackup``: a backup
part's plaintext, a raft snapshot, a database dump, a backup folder's part file that is not
ciphertext): an ``unencrypted-backup`` finding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from modelseal.errors import DecryptionError, FormatError
from modelseal.format.file import RawArtifact
from modelseal.format.header import KIND_BLOB, KIND_FILE, Recipient, Slot, parse_core, parse_slot
from modelseal.format.stream import ChunkLayout
from modelseal.telemetry import scanbackup, scankeys, scansig, sniff
from modelseal.telemetry.scanmodel import (
    CRITICAL,
    DAMAGED_SLOT,
    DISABLED_KEY_VERSION,
    PAST_CRYPTOPERIOD,
    PLAINTEXT,
    PLAINTEXT_MODEL,
    REVOKED,
    SEALED_SIGNED,
    SEALED_UNSIGNED,
    STATE_PAST_CRYPTOPERIOD,
    STATE_REVOKED,
    UNSIGNED,
    UNTRUSTED_SIGNATURE,
    Finding,
    ScanReport,
)

HEADER_READ = 160 * 1024  # format.file: more than the largest core header the bounds allow
FORMAT_NAMES = {
    sniff.SAFETENSORS: "safetensors",
    sniff.TORCH: "torch (zip) checkpoint",
    sniff.PICKLE: "pickle",
    sniff.ONNX: "ONNX",
    sniff.GGUF: "GGUF",
    sniff.NUMPY: "NumPy .npy",
    sniff.NPZ: "NumPy .npz",
    sniff.TFLITE: "TFLite",
    sniff.HDF5: "HDF5 (Keras .h5)",
    sniff.KERAS: "Keras (.keras zip)",
}


class Blob(Protocol):
    """One file of a target: where it is, its length, and bounded reads."""

    @property
    def location(self) -> str: ...

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


# For a sealed file (kind 1) or a folder's manifest (kind 2): (the artifact's location, the
# bytes of its signature files: none, one beside it, or a registry's referrers, newest first).
Neighbours = Callable[[int], tuple[str, list[bytes]]]


@dataclass
class ScanContext:
    report: ScanReport
    trust: scansig.TrustCheck
    keys: scankeys.KeyStates
    prefix: int = sniff.PREFIX  # bytes read first: a remote target reads more in one request


def examine(blob: Blob, ctx: ScanContext, neighbours: Neighbours) -> None:
    """Scan one file: count it, and add its findings and its artifact state to the report."""
    report = ctx.report
    report.files += 1
    prefix = blob.read(0, min(blob.size, ctx.prefix))
    fmt = sniff.sniff(prefix, blob.size, blob.read)
    if fmt != sniff.SEALED and (backup := scanbackup.check(blob.location, prefix, sealed=False)) is not None:
        report.formats["backup-in-clear"] += 1  # a backup part, raft snapshot or dump (scanbackup)
        report.add(backup)
        return
    if fmt is None:
        report.formats["other"] += 1
        return
    if fmt == sniff.SEALED:
        _sealed(blob, prefix, ctx, neighbours)
        return
    report.formats[fmt] += 1
    report.states[PLAINTEXT] += 1
    detail = f"a plaintext {FORMAT_NAMES[fmt]} model file, not sealed"
    report.add(Finding(PLAINTEXT_MODEL, blob.location, detail, CRITICAL))


def read_header(blob: Blob, prefix: bytes) -> RawArtifact:
    """The core header and both slots of the sealed file ``blob`` (``prefix`` is its first
    bytes), with the exact length check of docs/format.md, section 6: ``DecryptionError``
    for a damaged or truncated header, ``FormatError`` for an unsupported version or suite."""
    head = prefix
    try:
        core = parse_core(head)
    except DecryptionError:
        want = min(blob.size, HEADER_READ)
        if len(head) >= want:
            raise
        head = blob.read(0, want)
        core = parse_core(head)
    n = core.slot_size
    end = core.slots_offset + 2 * n
    if len(head) < end:
        head += blob.read(len(head), end - len(head))
    gap = head[len(core.raw) : core.slots_offset]
    if len(head) < end or gap.count(0) != len(gap):
        raise DecryptionError()  # truncated, or non-zero alignment padding
    layout = ChunkLayout(core.chunk_size, core.plaintext_length, core.payload_offset)
    if blob.size != layout.file_length:
        raise DecryptionError()  # truncated, or bytes appended
    start = core.slots_offset
    return RawArtifact(core, (head[start : start + n], head[start + n : end]), layout)


def _sealed(blob: Blob, prefix: bytes, ctx: ScanContext, neighbours: Neighbours) -> None:
    report = ctx.report
    try:
        raw = read_header(blob, prefix)
    except (FormatError, DecryptionError) as e:
        # Damaged, from a newer release, or another file behind the sealed magic: it cannot
        # be opened here, and nothing vouches for it.
        unsupported = isinstance(e, FormatError)
        report.formats["sealed-unsupported" if unsupported else "sealed-damaged"] += 1
        why = f"a header this release cannot read ({e})" if unsupported else "a damaged or truncated header"
        behind = sniff.sniff(prefix[len(sniff.SEALED_MAGIC) :], blob.size - len(sniff.SEALED_MAGIC))
        if behind in FORMAT_NAMES:
            why += f", and a plaintext {FORMAT_NAMES[behind]} model behind the magic"
        report.add(Finding(DAMAGED_SLOT, blob.location, f"a sealed magic with {why}: it cannot be opened", CRITICAL))
        return
    if raw.core.kind == KIND_BLOB:
        report.formats["sealed-blob"] += 1  # covered by its folder's manifest
        return
    kind = raw.core.kind
    report.formats["sealed" if kind == KIND_FILE else "sealed-folder"] += 1
    where, sigfiles = neighbours(kind)
    slots = _slots(raw, where, report)
    past = _keys(slots, where, ctx)
    verdict = ctx.trust.judge_any(raw, "." if kind == KIND_FILE else "manifest.mseal", sigfiles)
    if verdict.status == scansig.UNSIGNED:
        report.add(Finding(UNSIGNED, where, f"sealed but not signed: {verdict.detail}"))
    elif verdict.status == scansig.UNTRUSTED:
        report.add(Finding(UNTRUSTED_SIGNATURE, where, verdict.detail))
    elif verdict.status == scansig.REVOKED:
        report.add(Finding(REVOKED, where, verdict.detail, CRITICAL))
    elif verdict.status == scansig.UNVERIFIED:
        report.note(
            "no trust policy in force: signatures checked against the keys they carry only, anyone's key"
            " counts (--trust, MODELSEAL_TRUST)"
        )
    if verdict.status == scansig.REVOKED:
        state = STATE_REVOKED
    elif past:
        state = STATE_PAST_CRYPTOPERIOD
    elif verdict.status in (scansig.SIGNED, scansig.UNVERIFIED):
        state = SEALED_SIGNED
    else:
        state = SEALED_UNSIGNED
    report.states[state] += 1


def _slots(raw: RawArtifact, where: str, report: ScanReport) -> list[Slot]:
    """The well-formed slots, newest first; a damaged one is a finding."""
    parsed: list[tuple[int, Slot | None, bool]] = []  # (index, slot, damaged)
    for i, data in enumerate(raw.slots):
        if data.count(0) == len(data):  # empty: what parse_slot says too, without a byte loop
            parsed.append((i, None, False))
            continue
        try:
            parsed.append((i, parse_slot(data), False))
        except DecryptionError:
            parsed.append((i, None, True))
    good = sorted(((i, s) for i, s, _ in parsed if s is not None), key=lambda item: (-item[1].generation, item[0]))
    damaged = ["AB"[i] for i, _, bad in parsed if bad]
    if good and damaged:
        active = "AB"[good[0][0]]
        detail = f"inactive slot {damaged[0]} is damaged (a torn rewrap?); slot {active} opens it: rewrap to repair"
        report.add(Finding(DAMAGED_SLOT, where, detail))
    elif not good:
        what = f"slot {' and '.join(damaged)} damaged" if damaged else "both slots empty"
        report.add(Finding(DAMAGED_SLOT, where, f"no usable recipient slot ({what}): it cannot be opened", CRITICAL))
    return [s for _, s in good]


def _keys(slots: list[Slot], where: str, ctx: ScanContext) -> bool:
    """Findings when every recipient's KEK version is disabled or past its cryptoperiod;
    whether the artifact is past its cryptoperiod. Any version in a usable or unknown state
    means no finding."""
    seen: dict[tuple[str, str, int], Recipient] = {}
    for slot in slots:
        for r in slot.recipients:
            seen.setdefault((r.scheme, r.key_id, r.key_version), r)
    states = [ctx.keys.state(r) for r in seen.values()]
    if not states or any(s.status not in (scankeys.DISABLED, scankeys.PAST) for s in states):
        return False
    detail = "; ".join(s.detail for s in states)[:300]
    if any(s.status == scankeys.PAST for s in states):
        ctx.report.add(Finding(PAST_CRYPTOPERIOD, where, f"wrapped only under old KEK versions: {detail}"))
        return True
    ctx.report.add(Finding(DISABLED_KEY_VERSION, where, f"wrapped only under disabled KEK versions: {detail}"))
    return False


__all__ = ["FORMAT_NAMES", "HEADER_READ", "Blob", "Neighbours", "ScanContext", "examine", "read_header"]
