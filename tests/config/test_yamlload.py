"""zerotunnel.config.yamlload: YAML 1.2 scalars, duplicate keys, document indexes, alias bombs."""

from __future__ import annotations

import pytest

from zerotunnel.config import yamlload
from zerotunnel.config.yamlload import MAX_EXPANDED_NODES, ParsedDocument, parse_documents

LOADERS = [yamlload.Yaml12Loader] + ([yamlload.CYaml12Loader] if hasattr(yamlload, "CYaml12Loader") else [])


@pytest.fixture(autouse=True, params=LOADERS, ids=lambda cls: cls.__name__)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs on the pure-Python parser and on libyaml's: the semantics must not differ."""
    monkeypatch.setattr(yamlload, "LOADER", request.param)


def test_libyaml_is_used_when_available() -> None:
    assert len(LOADERS) == 2, "PyYAML without libyaml: large configurations load about 6x slower"


def one(text: str) -> object:
    docs, failure = parse_documents("t.yaml", text)
    assert failure is None, failure
    assert len(docs) == 1
    return docs[0].data


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [
        # YAML 1.1 booleans are strings in YAML 1.2 (and in Kubernetes)
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("n", "n"),
        ("Yes", "Yes"),
        ("ON", "ON"),
        # YAML 1.2 booleans
        ("true", True),
        ("false", False),
        ("True", True),
        ("FALSE", False),
        # integers: decimal, 0o, 0x; no YAML 1.1 octal, sexagesimal or underscores
        ("8080", 8080),
        ("-1", -1),
        ("+5", 5),
        ("012", 12),
        ("0o17", 15),
        ("0x1F", 31),
        ("1:30", "1:30"),
        ("1_000", "1_000"),
        ("0b101", "0b101"),
        # floats
        ("1.5", 1.5),
        ("1e3", 1000.0),
        (".5", 0.5),
        (".inf", float("inf")),
        ("-.Inf", float("-inf")),
        # null
        ("~", None),
        ("null", None),
        ("", None),
        # timestamps stay strings
        ("2024-05-01", "2024-05-01"),
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00Z"),
        # explicit tags still work
        ("!!str 8080", "8080"),
        ("!!int '42'", 42),
        ("!!timestamp 2024-05-01", "2024-05-01"),
    ],
)
def test_yaml_1_2_core_schema_scalars(scalar: str, expected: object) -> None:
    assert one(f"v: {scalar}\n") == {"v": expected}


def test_nan() -> None:
    value = one("v: .nan\n")
    assert isinstance(value, dict)
    assert value["v"] != value["v"]


def test_documents_keep_their_index_and_empty_ones_are_skipped() -> None:
    docs, failure = parse_documents("t.yaml", "---\na: 1\n---\n---\n# only a comment\n---\nb: 2\n")
    assert failure is None
    assert docs == [ParsedDocument(0, {"a": 1}), ParsedDocument(3, {"b": 2})]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", "line 3, column 1: duplicate key 'a' (first at line 1, column 1)"),
        ("m: {x: 1, x: 2}\n", "duplicate key 'x'"),
        ("a:\n  b: 1\n  b: 1\n", "duplicate key 'b'"),
        ("1: a\n'1': b\n", ""),  # different keys (int and string): not a duplicate
    ],
)
def test_duplicate_keys(text: str, message: str) -> None:
    _, failure = parse_documents("t.yaml", text)
    if not message:
        assert failure is None
        return
    assert failure is not None
    assert failure.index == 0
    assert message in failure.message


def test_merge_keys_are_not_duplicates() -> None:
    assert one("base: &b {x: 1}\nm:\n  <<: *b\n  y: 2\n") == {"base": {"x": 1}, "m": {"x": 1, "y": 2}}


def test_syntax_error_reports_the_failing_document_and_keeps_earlier_ones() -> None:
    docs, failure = parse_documents("t.yaml", "a: 1\n---\nb: [1,\n")
    assert docs == [ParsedDocument(0, {"a": 1})]
    assert failure is not None
    assert failure.index == 1
    assert failure.message.startswith("invalid YAML: line 4, column 1:")
    assert "\n" not in failure.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !!python/object:os.system x\n", "could not determine a constructor"),
        ("a: \x1f\n", "character #x001f at position 3 is not allowed"),
        ("a: &x [*x]\n", "an alias refers to the node that contains it"),
        ("[" * 5000 + "]" * 5000, "nest"),  # "nested too deeply" / libyaml's "maximum nesting depth"
        ("a: !!omap [1]\n", "expected a mapping of length 1"),
    ],
)
def test_hostile_text_is_a_parse_failure(text: str, message: str) -> None:
    _, failure = parse_documents("t.yaml", text)
    assert failure is not None
    assert message in failure.message


def test_alias_bomb_is_rejected() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    _, failure = parse_documents("t.yaml", "\n".join(lines) + "\n")
    assert failure is not None
    assert f"more than {MAX_EXPANDED_NODES} nodes" in failure.message


def test_shared_aliases_within_the_limit_are_fine() -> None:
    assert one("a: &x [1]\nb: *x\n") == {"a": [1], "b": [1]}


def test_json_files() -> None:
    docs, failure = parse_documents("t.json", '{"a": [1, true, null, "yes"]}')
    assert failure is None
    assert docs == [ParsedDocument(0, {"a": [1, True, None, "yes"]})]
    _, failure = parse_documents("t.json", '{"a": 1, "a": 2}')
    assert failure is not None
    assert "duplicate key 'a'" in failure.message
    _, failure = parse_documents("t.json", "{nope")
    assert failure is not None
    assert failure.message.startswith("invalid JSON:")
    assert parse_documents("t.json", "null") == ([], None)
