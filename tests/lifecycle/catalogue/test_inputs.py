"""The core's input models refuse bad values with one error type and one line, the same for every
edge; and a metadata key the filter language reads is exactly a key `--meta` sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.catalogue.inputs import (
    DatasetCreate,
    ExpiryChange,
    InputModel,
    ItemCreate,
    ItemOptions,
    MetadataUpdate,
    PhaseChange,
)
from lifecycle.catalogue.metadata import parse_meta
from lifecycle.catalogue.models import StorageCreate
from lifecycle.catalogue.query_parse import parse
from lifecycle.errors import InvalidFilterError, InvalidMetadataError, InvalidValueError
from lifecycle.states import Phase, StorageKind, Tier

GOOD_ITEM = {"name": "run/a.dat", "size": 10}
GOOD_STORAGE = {"name": "disk-a", "kind": "posix", "root": "/data/a"}
MD5 = "0123456789abcdef0123456789abcdef"

REFUSED: list[tuple[str, type[Any], dict[str, Any], str]] = [
    # ItemCreate (and ItemOptions, which it extends)
    ("item-dotdot", ItemCreate, {**GOOD_ITEM, "name": "a/../b"}, "'..'"),
    ("item-at", ItemCreate, {**GOOD_ITEM, "name": "n@v2"}, "version separator"),
    ("item-control", ItemCreate, {**GOOD_ITEM, "name": "a\x1bb"}, "U+001B"),
    ("item-size-negative", ItemCreate, {**GOOD_ITEM, "size": -1}, "invalid size -1"),
    ("item-size-text", ItemCreate, {**GOOD_ITEM, "size": "10"}, "invalid size '10'"),
    ("item-size-huge", ItemCreate, {**GOOD_ITEM, "size": 2**63}, "non-negative integer"),
    ("item-checksum", ItemCreate, {**GOOD_ITEM, "checksum": "xyz"}, "must be 32 hex digits"),
    ("item-algo", ItemCreate, {**GOOD_ITEM, "checksum_algo": "crc32"}, "unknown checksum algorithm 'crc32'"),
    ("item-phase", ItemCreate, {**GOOD_ITEM, "phase": "VAPOUR"}, "invalid phase 'VAPOUR': use one of"),
    ("item-lifetime-zero", ItemCreate, {**GOOD_ITEM, "lifetime": "0d"}, "greater than zero"),
    ("item-lifetime-junk", ItemCreate, {**GOOD_ITEM, "lifetime": "30 days"}, "invalid lifetime '30 days'"),
    ("item-lifetime-negative", ItemOptions, {"lifetime": timedelta(days=-1)}, "greater than zero"),
    ("item-lifetime-too-long", ItemOptions, {"lifetime": timedelta(days=400_000)}, "1000 years"),
    ("item-expiry-junk", ItemOptions, {"expires_at": "tomorrow"}, "invalid date 'tomorrow'"),
    ("item-two-expiries", ItemOptions, {"lifetime": "1d", "expires_at": "2030-01-01"}, "not both"),
    ("item-owner-newline", ItemOptions, {"owner": "alice\nroot"}, "invalid owner 'alice\\nroot'"),
    ("item-owner-blank", ItemOptions, {"owner": "   "}, "invalid owner '   ': empty"),
    ("item-meta-nan", ItemOptions, {"metadata": {"n": float("nan")}}, "finite"),
    ("item-meta-list", ItemOptions, {"metadata": [1]}, "must be a JSON object"),
    ("item-meta-key-control", ItemOptions, {"metadata": {"a\x07": 1}}, "U+0007"),
    ("item-meta-too-big", ItemOptions, {"metadata": {"b": "x" * 70_000}}, "64 KiB"),
    ("item-parent-absolute", ItemOptions, {"parents": ["/etc"]}, "absolute"),
    ("item-unknown-field", ItemOptions, {"colour": "red"}, "invalid colour: Extra inputs are not permitted"),
    # StorageCreate
    ("storage-name", StorageCreate, {**GOOD_STORAGE, "name": "Bad Name"}, "invalid storage name 'Bad Name'"),
    ("storage-name-long", StorageCreate, {**GOOD_STORAGE, "name": "s" * 100}, "at most 64 characters"),
    ("storage-kind", StorageCreate, {**GOOD_STORAGE, "kind": "ftp"}, "invalid storage kind 'ftp'"),
    ("storage-memory", StorageCreate, {**GOOD_STORAGE, "kind": "memory"}, "unit tests only"),
    ("storage-tier", StorageCreate, {**GOOD_STORAGE, "tier": "tepid"}, "invalid tier 'tepid'"),
    (
        "storage-capacity-words",
        StorageCreate,
        {**GOOD_STORAGE, "capacity_bytes": "lots"},
        "invalid size 'lots'",
    ),
    ("storage-capacity-frac", StorageCreate, {**GOOD_STORAGE, "capacity_bytes": "0.3KiB"}, "whole number"),
    (
        "storage-capacity-zero",
        StorageCreate,
        {**GOOD_STORAGE, "capacity_bytes": 0},
        "capacity must be positive",
    ),
    (
        "storage-creds-env",
        StorageCreate,
        {**GOOD_STORAGE, "credentials_env": "lower"},
        "credentials env prefix",
    ),
    (
        "storage-posix-region",
        StorageCreate,
        {**GOOD_STORAGE, "region": "eu"},
        "endpoint and region apply to s3 storages only",
    ),
    (
        "storage-endpoint-secret",
        StorageCreate,
        {**GOOD_STORAGE, "kind": "s3", "root": "bucket", "endpoint": "http://u:hunter2@h"},
        "credentials do not belong in the endpoint URL",
    ),
    # DatasetCreate
    ("dataset-name", DatasetCreate, {"name": "Bad", "where": "size > 1"}, "invalid dataset name 'Bad'"),
    ("dataset-filter", DatasetCreate, {"name": "d", "where": "size >"}, "expected a value"),
    ("dataset-empty-filter", DatasetCreate, {"name": "d", "where": ""}, "empty filter"),
    ("dataset-owner", DatasetCreate, {"name": "d", "where": "size > 1", "owner": "a\x1b"}, "U+001B"),
    # changes
    ("phase-typo", PhaseChange, {"phase": "sollid"}, "invalid phase 'sollid'"),
    ("expiry-none", ExpiryChange, {}, "give exactly one of lifetime, at or never"),
    ("expiry-two", ExpiryChange, {"lifetime": "1d", "never": True}, "exactly one"),
    ("expiry-bad-date", ExpiryChange, {"at": "2026-02-30"}, "invalid date '2026-02-30'"),
    ("meta-update-key", MetadataUpdate, {"values": {"a b": 1}}, "invalid metadata key 'a b'"),
    ("meta-update-not-object", MetadataUpdate, {"values": [1]}, "must be a JSON object"),
]


@pytest.mark.parametrize(
    ("model", "values", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_input_models_refuse_bad_values_with_one_error_type(
    model: type[InputModel], values: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidValueError) as caught:
        model(**values)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and "validation error" not in text.lower()
    assert "hunter2" not in text


def test_an_edge_names_fields_its_own_way() -> None:
    """The CLI says --owner and --lifetime where the field is owner and lifetime; the rule is one."""
    with pytest.raises(InvalidValueError, match=r"^invalid --owner '   ': empty$"):
        ItemOptions.build({"owner": "--owner"}, owner="   ")
    with pytest.raises(InvalidValueError, match=r"^give exactly one of --lifetime, --at or --never$"):
        ExpiryChange.build({"lifetime": "--lifetime", "at": "--at", "never": "--never"})
    with pytest.raises(InvalidValueError, match=r"^invalid owner '   ': empty$"):  # labels do not stick
        ItemOptions(owner="   ")
    with pytest.raises(InvalidValueError, match=r"^--endpoint and --region apply to s3 storages only$"):
        StorageCreate.build({"endpoint": "--endpoint", "region": "--region"}, **GOOD_STORAGE, region="eu")


def test_input_models_normalise_what_they_accept() -> None:
    item = ItemCreate(
        name="cafe\u0301.dat".replace("e\u0301", "\u00e9"),
        size=0,
        checksum=MD5.upper(),
        phase="liquid",
        lifetime="2d",
        owner="bob",
        metadata={"obs": {"band": "r"}},
    )
    assert (item.phase, item.checksum, item.checksum_algo) == (Phase.LIQUID, MD5, "md5")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert item.expiry(now) == now + timedelta(days=2)
    assert ItemOptions(expires_at="2030-01-31").expiry(now) == datetime(2030, 1, 31, tzinfo=UTC)
    storage = StorageCreate(name="tape", kind="S3", root="b", tier="Archive", capacity_bytes="1.5KiB")
    assert (storage.kind, storage.tier, storage.capacity_bytes) == (StorageKind.S3, Tier.ARCHIVE, 1536)
    assert ExpiryChange(never=True).expires_at(now) is None
    assert ExpiryChange(at="2030-01-01").expires_at(now) == datetime(2030, 1, 1, tzinfo=UTC)
    assert MetadataUpdate(values={"obs.band": "r", "n": 1}).applied({"obs": {"night": 3}}) == {
        "obs": {"night": 3, "band": "r"},
        "n": 1,
    }
    with pytest.raises(InvalidMetadataError, match="'a' holds a value, not an object"):
        MetadataUpdate(values={"a.b": 2}).applied({"a": 1})


# --------------------------------------------------------------------------- metadata keys


def _filter_accepts(key: str) -> bool:
    try:
        parse(f"meta.{key} = 1")
    except InvalidFilterError:
        return False
    return True


def _set_accepts(key: str) -> bool:
    try:
        parse_meta([f"{key}=1"], None)
    except InvalidMetadataError:
        return False
    return True


def _update_accepts(key: str) -> bool:
    try:
        MetadataUpdate(values={key: 1})
    except InvalidValueError:
        return False
    return True


# Characters a filter word may hold (letters in any script, digits, _ . : + - / * ? @ %), so that
# `meta.KEY` is one token and the filter's verdict is about the key alone.
KEY_CHARS = st.sampled_from([*"abzAZ09_-.:+/*?@%", "\u00e9", "\u00df", "\u0663"])


@settings(max_examples=400, deadline=None)
@given(st.text(KEY_CHARS, min_size=1, max_size=12))
def test_a_key_the_filter_reads_is_a_key_set_accepts_and_the_reverse(key: str) -> None:
    assert _filter_accepts(key) == _set_accepts(key) == _update_accepts(key), key


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("kind", True),
        ("obs.band", True),
        ("1x", True),  # `--meta` used to refuse a leading digit the filter reads
        ("a-b_c", True),
        ("a" * 128, True),
        ("a" * 129, False),  # the filter used to read keys of any length
        ("a..b", False),  # `--meta` used to set a flat key "a..b" no filter could read
        ("a.", False),
        ("caf\u00e9", False),
        ("a@b", False),
    ],
)
def test_metadata_key_examples(key: str, ok: bool) -> None:
    assert (_filter_accepts(key), _set_accepts(key), _update_accepts(key)) == (ok, ok, ok)


def test_a_dotted_key_is_set_nested_where_the_filter_reads_it() -> None:
    assert parse_meta(["obs.band=r", "obs.night=3", "kind=raw"], None) == {
        "obs": {"band": "r", "night": 3},
        "kind": "raw",
    }
    assert parse_meta(["obs.band=r", "obs.band=g"], None) == {"obs": {"band": "g"}}  # the last wins
    for pairs in (["obs.band=r", "obs=5"], ["obs=5", "obs.band=r"]):  # one would drop the other
        with pytest.raises(InvalidMetadataError, match="'obs"):
            parse_meta(pairs, None)


@pytest.mark.parametrize(
    "bad",
    [{"checksum": "xyz"}, {"checksum": "ab" * 20, "checksum_algo": "sha1x"}, {"size": -1}, {"size": True}],
    ids=["checksum", "algo", "size-negative", "size-bool"],
)
def test_a_list_row_is_refused_with_the_item_create_message(bad: dict[str, Any]) -> None:
    """`--from-list` rows keep their fast path but share ItemCreate's rules and words."""
    import io
    import json

    from lifecycle.catalogue.bulk_sources import RowError, Source

    row = {"name": "bulk/a.dat", "size": 10, **bad}
    with pytest.raises(InvalidValueError) as model_error:
        ItemCreate(**row)
    with Source(io.StringIO(json.dumps(row) + "\n"), "jsonl") as (_label, records, parse_row):
        [(lineno, record)] = list(records)
        with pytest.raises(RowError) as row_error:
            parse_row(record, lineno)
    assert row_error.value.message == str(model_error.value)


def _nested(levels: int) -> dict[str, Any]:
    """A metadata document `levels` objects deep ({"a": {"a": ... {"v": 1}}})."""
    doc: dict[str, Any] = {"v": 1}
    for _ in range(levels - 1):
        doc = {"a": doc}
    return doc


def test_metadata_nested_past_the_limit_is_refused_and_at_the_limit_it_lists_as_json() -> None:
    """A document nested hundreds of levels deep once passed validation, was stored, and then broke
    every `dlm items list --json` (pydantic stops serialising at ~255 levels) and crashed a
    `--from-list` write (orjson's limit) with an internal error: now refused, in one line."""
    import orjson

    from lifecycle.catalogue.metadata import MAX_META_DEPTH
    from lifecycle.catalogue.public import ItemPublic

    with pytest.raises(InvalidMetadataError, match=f"more than {MAX_META_DEPTH} levels"):
        ItemOptions(metadata=_nested(MAX_META_DEPTH + 1))
    with pytest.raises(InvalidMetadataError, match="levels"):
        ItemOptions(metadata={"list": [_nested(300)]})
    meta = ItemOptions(metadata=_nested(MAX_META_DEPTH)).metadata
    now = datetime.now(UTC)
    public = ItemPublic(
        oid="00000000-0000-0000-0000-000000000001",
        name="a",
        version=1,
        size=1,
        checksum=None,
        checksum_algo=None,
        state="READY",
        target_phase="GAS",
        owner=None,
        created_at=now,
        expires_at=None,
        metadata=meta,
    )
    assert public.model_dump(mode="json")["metadata"] == meta
    assert orjson.loads(orjson.dumps(meta)) == meta


def test_a_metadata_update_leaves_the_stored_metadata_as_it_was() -> None:
    """Setting `obs.exp` on {"obs": {...}} must not change the item's own (nested) dict in place:
    the ORM compares the old value with the new one to decide whether to write, and a refused
    update must leave the item's metadata untouched."""
    stored = {"obs": {"band": "r"}}
    assert MetadataUpdate(values={"obs.exp": 3}).applied(stored) == {"obs": {"band": "r", "exp": 3}}
    assert stored == {"obs": {"band": "r"}}
    with pytest.raises(InvalidMetadataError):
        MetadataUpdate(values={"obs.blob": "x" * 70_000}).applied(stored)
    assert stored == {"obs": {"band": "r"}}
