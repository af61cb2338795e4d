"""RFC 9162 Merkle tree code against the Certificate Transparency reference vectors."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from modelseal.audit import merkle

# The CT reference tree: eight leaves and the tree head for every size 0..8.
DATA = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]
LEAVES = [merkle.leaf_hash(d) for d in DATA]
ROOTS = [
    bytes.fromhex(h)
    for h in [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]
# (leaf index 0-based, tree size, audit path)
INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
# (first size, second size, consistency proof)
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


def test_reference_tree_heads() -> None:
    frontier = merkle.Frontier()
    assert merkle.root([]) == ROOTS[0] == frontier.root()
    for n in range(1, 9):
        assert merkle.root(LEAVES[:n]) == ROOTS[n]
        assert frontier.append(LEAVES[n - 1]) == ROOTS[n]


def test_reference_inclusion_proofs() -> None:
    for index, size, path in INCLUSION:
        proof = merkle.inclusion_proof(index, LEAVES[:size])
        assert [p.hex() for p in proof] == path
        assert merkle.verify_inclusion(index, size, LEAVES[index], proof, ROOTS[size])
        assert not merkle.verify_inclusion(index, size, LEAVES[index], proof, ROOTS[size - 1])
        assert not merkle.verify_inclusion(index, size, LEAVES[(index + 1) % size], proof, ROOTS[size])
        if proof:
            assert not merkle.verify_inclusion(index, size, LEAVES[index], proof[:-1], ROOTS[size])


def test_reference_consistency_proofs() -> None:
    for first, second, path in CONSISTENCY:
        proof = merkle.consistency_proof(first, LEAVES[:second])
        assert [p.hex() for p in proof] == path
        assert merkle.verify_consistency(first, second, proof, ROOTS[first], ROOTS[second])
        if first != second:
            assert not merkle.verify_consistency(
                first, second, proof, ROOTS[first - 1] if first > 1 else ROOTS[2], ROOTS[second]
            )
            assert not merkle.verify_consistency(first, second, proof[1:], ROOTS[first], ROOTS[second])


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=70), st.randoms(use_true_random=False))
def test_property_every_proof_verifies_and_tampering_fails(n: int, rnd: random.Random) -> None:
    leaves = [merkle.leaf_hash(rnd.randbytes(rnd.randint(0, 8))) for _ in range(n)]
    heads = [merkle.root(leaves[:m]) for m in range(n + 1)]
    i = rnd.randrange(n)
    proof = merkle.inclusion_proof(i, leaves)
    assert merkle.verify_inclusion(i, n, leaves[i], proof, heads[n])
    assert not merkle.verify_inclusion(i, n, merkle.leaf_hash(b"forged"), proof, heads[n])
    m = rnd.randint(1, n)
    cproof = merkle.consistency_proof(m, leaves)
    assert merkle.verify_consistency(m, n, cproof, heads[m], heads[n])
    if m < n:
        assert not merkle.verify_consistency(m, n, cproof, merkle.leaf_hash(b"x"), heads[n])
