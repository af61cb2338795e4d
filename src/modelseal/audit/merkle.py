"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing and proofs.

Pure functions over lists of leaf hashes: the tree head (MTH, section 2.1.1),
inclusion proofs (PATH, 2.1.3.1) and their verification (2.1.3.2), consistency
proofs (PROOF, 2.1.4.1) and their verification (2.1.4.2). Checked against the
Certificate Transparency reference vectors in tests/test_merkle.py. Written
here because the maintained Python implementation (pymerkle) is GPL.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf *hashes*."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) for leaf ``index`` (0-based)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError("leaf index outside the tree")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root(leaves[:k])]


def consistency_proof(first: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) that the tree of the first ``first`` leaves is a prefix of this one."""
    if not 0 < first <= len(leaves):
        raise ValueError("consistency proof needs 0 < first <= size")
    return _subproof(first, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), root(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root(leaves[:k])]


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(r, expected_root)


def verify_consistency(first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes) -> bool:
    """RFC 9162 section 2.1.4.2."""
    if not 0 < first <= second:
        return False
    if first == second:
        return not proof and hmac.compare_digest(first_root, second_root)
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the first root is a node of the path
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(fr, first_root) and hmac.compare_digest(sr, second_root)


class Frontier:
    """Incremental tree head: the roots of the perfect subtrees of the current tree."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (height, hash), left to right
        self.size = 0

    def append(self, leaf: bytes) -> bytes:
        h, node = 0, leaf
        while self._stack and self._stack[-1][0] == h:
            _, left = self._stack.pop()
            node = node_hash(left, node)
            h += 1
        self._stack.append((h, node))
        self.size += 1
        return self.root()

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node

    def hashes(self) -> list[bytes]:
        """The subtree roots, left to right: with ``size`` they restore the frontier."""
        return [node for _, node in self._stack]

    @classmethod
    def restore(cls, size: int, hashes: list[bytes]) -> Frontier:
        """The frontier of a tree of ``size`` leaves from its ``hashes()``; ``ValueError`` if they do not fit."""
        heights = [h for h in range(size.bit_length() - 1, -1, -1) if size >> h & 1]
        if size < 0 or len(hashes) != len(heights) or any(len(x) != 32 for x in hashes):
            raise ValueError("not the frontier of a tree of that size")
        f = cls()
        f._stack = list(zip(heights, hashes, strict=True))
        f.size = size
        return f
