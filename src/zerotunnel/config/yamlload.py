"""Parse YAML text the way Kubernetes does (YAML 1.2 core schema), not the way PyYAML does (YAML 1.1).

DESIGN.md §6 warns about YAML 1.1 booleans: PyYAML's SafeLoader turns `yes`/`no`/`on`/`off` into
booleans, `1:30` into 90, `012` into 10 and unquoted dates into datetimes. Kubernetes (sigs.k8s.io/yaml)
reads all of those as strings, so a manifest that works with kubectl must mean the same here. The loader
below starts from an empty resolver table and registers only the YAML 1.2 core schema: null, true/false,
decimal/0o/0x integers and floats (plus `<<` merge keys, which Kubernetes' YAML library also
honours). Duplicate keys are rejected instead of silently keeping the last one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node


class _Yaml12Resolver(yaml.resolver.Resolver):
    """Only the YAML 1.2 core schema's implicit tags; everything else is a string."""

    yaml_implicit_resolvers: dict[str | None, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012 (PyYAML's class-level table)


_Yaml12Resolver.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
_Yaml12Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_Yaml12Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Yaml12Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class _Yaml12Constructor(yaml.constructor.SafeConstructor):
    def construct_yaml_bool(self, node: Node) -> bool:
        value = self.construct_scalar(node)  # type: ignore[arg-type]
        if not isinstance(value, str) or value.lower() not in ("true", "false"):
            raise ConstructorError(None, None, f"invalid boolean {value!r}", node.start_mark)
        return value.lower() == "true"

    def construct_yaml_int(self, node: Node) -> int:
        value = str(self.construct_scalar(node))  # type: ignore[arg-type]
        try:
            if value.startswith("0o"):
                return int(value[2:], 8)
            if value.startswith("0x"):
                return int(value[2:], 16)
            return int(value, 10)
        except ValueError:
            raise ConstructorError(None, None, f"invalid integer {value!r}", node.start_mark) from None

    def construct_yaml_float(self, node: Node) -> float:
        value = str(self.construct_scalar(node)).lower()  # type: ignore[arg-type]
        if value.endswith(".inf"):
            return float("-inf") if value.startswith("-") else float("inf")
        if value == ".nan":
            return float("nan")
        try:
            return float(value)
        except ValueError:
            raise ConstructorError(None, None, f"invalid float {value!r}", node.start_mark) from None

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Hashable, Any]:
        if isinstance(node, MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        "found an unhashable key",
                        key_node.start_mark,
                    )
                if key in seen:
                    first = seen[key]
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key!r} (first at line {first.line + 1}, column {first.column + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


_Yaml12Constructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:timestamp", _Yaml12Constructor.construct_yaml_str
)
_Yaml12Constructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:bool", _Yaml12Constructor.construct_yaml_bool
)
_Yaml12Constructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:int", _Yaml12Constructor.construct_yaml_int
)
_Yaml12Constructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:float", _Yaml12Constructor.construct_yaml_float
)


class Yaml12Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _Yaml12Constructor,
    _Yaml12Resolver,
):
    """A safe loader with YAML 1.2 core-schema scalars and duplicate-key rejection."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Yaml12Constructor.__init__(self)
        _Yaml12Resolver.__init__(self)


_CParser: Any
try:
    import yaml.cyaml

    _CParser = getattr(yaml.cyaml, "CParser", None)
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None


if _CParser is not None:

    class CYaml12Loader(_CParser, _Yaml12Constructor, _Yaml12Resolver):  # type: ignore[misc]
        """The same loader on libyaml's parser: about 6x faster on large inputs. Scalars are still
        resolved and constructed by the Python classes above, so the semantics are identical."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            _Yaml12Constructor.__init__(self)
            _Yaml12Resolver.__init__(self)

    LOADER: type[Any] = CYaml12Loader
else:  # pragma: no cover - PyYAML built without libyaml
    LOADER = Yaml12Loader


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    index: int
    data: Any


@dataclass(frozen=True, slots=True)
class ParseFailure:
    """The text stopped parsing in document `index`; documents before it were parsed."""

    index: int
    message: str


def _mark(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML: {_mark(exc.problem_mark)}{problem}{context}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"invalid YAML: character #x{exc.character:04x} at position {exc.position} is not allowed"
    return "invalid YAML: " + " ".join(str(exc).split())


MAX_EXPANDED_NODES = 1_000_000
"""Aliases let a few lines of YAML stand for billions of nodes ("billion laughs"); Kubernetes caps
alias expansion too. A real manifest is far below this."""


class _AliasError(ValueError):
    pass


def _check_expansion(data: Any) -> None:
    """Reject a document whose aliases expand past MAX_EXPANDED_NODES or refer to themselves."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _AliasError("an alias refers to the node that contains it")
        active.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise _AliasError(f"aliases expand to more than {MAX_EXPANDED_NODES} nodes")
        sizes[key] = total
        return total

    size(data)


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_documents(name: str, text: str) -> tuple[list[ParsedDocument], ParseFailure | None]:
    """Every document of a YAML stream (or the one value of a `.json` file), with its index.

    Empty documents are skipped but still count for the index, so the index matches what a reader
    counts between `---` separators.
    """
    if name.endswith(".json"):
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicate_json_keys)
        except (ValueError, RecursionError) as exc:
            return [], ParseFailure(0, f"invalid JSON: {exc}")
        return ([ParsedDocument(0, data)] if data is not None else []), None

    docs: list[ParsedDocument] = []
    index = 0
    may_alias = "&" in text  # no anchor, no alias: skip the expansion walk
    loader: Any = None
    try:
        loader = LOADER(text)
        while loader.check_data():
            data = loader.get_data()
            if data is not None:
                if may_alias:
                    _check_expansion(data)
                docs.append(ParsedDocument(index, data))
            index += 1
    except yaml.YAMLError as exc:
        return docs, ParseFailure(index, _yaml_message(exc))
    except RecursionError:
        return docs, ParseFailure(index, "invalid YAML: nested too deeply")
    except Exception as exc:
        # PyYAML's constructors are not hardened against every malformed explicit tag (`!!omap`,
        # `!!timestamp` on odd text raise AttributeError/TypeError); whatever it raises on user
        # text is a problem with that text, reported like any other.
        return docs, ParseFailure(index, "invalid YAML: " + " ".join(str(exc).split()))
    finally:
        if loader is not None:
            loader.dispose()
    return docs, None
