"""The core's validators of input (names, owners, metadata, sizes) and the URL redaction."""

from __future__ import annotations

import logging

import pytest

from lifecycle.catalogue.metadata import MAX_META_BYTES, validate_metadata
from lifecycle.errors import DLMError, InvalidMetadataError, InvalidNameError, InvalidValueError
from lifecycle.names import validate_name, validate_owner
from lifecycle.redact import install_log_redaction, redact
from lifecycle.units import parse_size


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("n@v2", "version separator"),
        ("a@b/c", "version separator"),
        ("   ", "blank"),
        (" a", "whitespace"),
        ("a/b ", "whitespace"),
        ("a/\u3000b", "whitespace"),  # ideographic space
        ("\u00e9" * 128, "255 bytes"),  # 128 characters, 256 bytes
    ],
)
def test_item_names_refused(name: str, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message):
        validate_name(name)


def test_paths_of_files_on_a_storage_keep_at_and_spaces() -> None:
    """Only item names are restricted: a file `a@b .dat` on a storage is still a valid path."""
    assert validate_name("dir/a@b .dat", what="path") == "dir/a@b .dat"
    assert validate_name("\u00e9" * 127) == "\u00e9" * 127  # 254 bytes
    with pytest.raises(InvalidNameError, match="255 bytes"):
        validate_name("\u00e9" * 128, what="path")


@pytest.mark.parametrize(
    ("owner", "message"), [("a\x1bb", "U\\+001B"), ("a\nb", "U\\+000A"), ("", "empty"), (" a", "whitespace")]
)
def test_owners_refused(owner: str, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message):
        validate_owner(owner)


def test_owner_normalised_to_nfc() -> None:
    assert validate_owner("Jose\u0301") == "Jos\u00e9"


def test_metadata_keys_nfc_and_values_finite() -> None:
    assert validate_metadata({"cafe\u0301": {"x": [1, 2.5, None, True, "t"]}}) == {
        "caf\u00e9": {"x": [1, 2.5, None, True, "t"]}
    }
    for bad, message in (
        ({"n": float("inf")}, "finite"),
        ({"n": [{"m": float("nan")}]}, "finite"),
        ({"a\x07": 1}, "U\\+0007"),
        ({"x": {"k\u200b": 1}}, "U\\+200B"),
        ({"cafe\u0301": 1, "caf\u00e9": 2}, "given twice"),
        ({"blob": "x" * MAX_META_BYTES}, "64 KiB"),
    ):
        with pytest.raises(InvalidMetadataError, match=message):
            validate_metadata(bad)


@pytest.mark.parametrize("text", ["1.5B", "0.3KiB", "0.0001KB"])
def test_sizes_must_be_whole_bytes(text: str) -> None:
    with pytest.raises(InvalidValueError, match="whole number of bytes"):
        parse_size(text)


def test_sizes_with_fractions_that_are_whole_bytes() -> None:
    assert parse_size("1.5KiB") == 1536
    assert parse_size("0.5GB") == 500_000_000


def test_redaction_in_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    assert (
        redact("postgresql://dlm:p@ss@db/x and http://u:s@h:9/p")
        == "postgresql://dlm:***@db/x and http://u:***@h:9/p"
    )
    assert redact("http://host/a@b and user@host") == "http://host/a@b and user@host"
    assert "secret" not in str(DLMError("cannot reach postgresql://dlm:secret@db/x"))
    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("dlm.test").info("endpoint %s failed", "http://key:secret@s3.example")
    assert "secret" not in caplog.text and "key:***@s3.example" in caplog.text
