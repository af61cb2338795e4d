"""The OCI grammar of repository names, tags and digests (registry.names)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelseal.errors import RegistryRefused
from modelseal.registry import names

GOOD_NAMES = ["a", "library/ubuntu", "conformance/repo1", "a.b/c_d/e__f/g-h---i", "x" * 128, "a/" * 15 + "b"]
BAD_NAMES = [
    "",
    "..",
    "a/../b",
    "a/./b",
    "../etc/passwd",
    "UPPER",
    "a/Bad",
    "a\x00b",
    "/a",
    "a/",
    "a//b",
    "-a",
    "a-",
    "a..b",
    "a___b",
    "a b",
    "a%2fb",
    "x" * 129,
    "a/" * 16 + "b",
    ("abcdefgh/" * 29) + "a",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_valid_names(name: str) -> None:
    assert names.check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_name_invalid(name: str) -> None:
    with pytest.raises(RegistryRefused) as e:
        names.check_name(name)
    assert e.value.status == 400 and e.value.code == "NAME_INVALID"
    assert "\n" not in str(e.value) and "\x00" not in str(e.value)


def test_messages_name_the_attack() -> None:
    for name, word in (("a/../b", ".."), ("Repo", "uppercase"), ("a\x00", "NUL")):
        with pytest.raises(RegistryRefused, match=word):
            names.check_name(name)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b_c.d", "x" * 128])
def test_valid_tags(tag: str) -> None:
    assert names.check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a/b", "a:b", "x" * 129, "a\x00", "ünï"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(RegistryRefused) as e:
        names.check_tag(tag)
    assert e.value.status == 400


def test_digests() -> None:
    d = names.parse_digest("sha256:" + "ab" * 32)
    assert (d.algorithm, d.hex, str(d)) == ("sha256", "ab" * 32, "sha256:" + "ab" * 32)
    assert names.parse_digest("sha512:" + "0" * 128).algorithm == "sha512"
    for bad in (
        "sha256:baddigeststring",
        "sha256:" + "AB" * 32,
        "sha256:" + "a" * 63,
        "md5:" + "a" * 32,
        "sha256",
        "",
        "sha256:../x",
    ):
        with pytest.raises(RegistryRefused) as e:
            names.parse_digest(bad)
        assert e.value.status == 400 and e.value.code == "DIGEST_INVALID"


def test_reference_is_a_tag_or_a_digest() -> None:
    assert names.parse_reference("v1") == "v1"
    assert isinstance(names.parse_reference("sha256:" + "1" * 64), names.Digest)
    with pytest.raises(RegistryRefused):
        names.parse_reference("sha256:nothex")


@given(st.text(max_size=300))
def test_anything_accepted_is_path_safe(text: str) -> None:
    try:
        names.check_name(text)
    except RegistryRefused:
        return
    assert ".." not in text.split("/") and "\x00" not in text and not text.startswith("/")
    assert text == text.lower() and len(text) <= names.MAX_NAME
