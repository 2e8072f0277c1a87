"""zerotunnel.control.files: paths → (name, text) pairs, like `kubectl apply -f DIR -R`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from zerotunnel.config import load
from zerotunnel.control.files import read_config_paths
from zerotunnel.errors import InputError

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n"


def test_directories_are_read_recursively_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "z").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "one.yaml").write_text(NS.format("b1"))
    (tmp_path / "a" / "z" / "two.yml").write_text(NS.format("az2"))
    (tmp_path / "a" / "three.json").write_text(
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a3"}}'
    )
    (tmp_path / "a" / "notes.txt").write_text("not config")
    (tmp_path / ".git" / "x.yaml").write_text("ignored: true")
    (tmp_path / ".hidden.yaml").write_text("ignored: true")
    (tmp_path / "UPPER.YAML").write_text(NS.format("upper"))
    pairs = read_config_paths([tmp_path])
    assert [Path(name).relative_to(tmp_path).as_posix() for name, _ in pairs] == [
        "UPPER.YAML",
        "a/three.json",
        "a/z/two.yml",
        "b/one.yaml",
    ]
    assert [n.meta.name for n in load(pairs).namespaces] == ["upper", "a3", "az2", "b1"]


def test_files_are_read_in_the_order_given_whatever_their_suffix(tmp_path: Path) -> None:
    first = tmp_path / "z.conf"
    second = tmp_path / "a.yaml"
    first.write_text(NS.format("z"))
    second.write_text(NS.format("a"))
    assert read_config_paths([str(first), second]) == [
        (str(first), NS.format("z")),
        (str(second), NS.format("a")),
    ]


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(NS.format("a"))
    assert len(read_config_paths([f, tmp_path, f])) == 1


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + NS.format("bom").encode())
    assert load(read_config_paths([f])).namespaces[0].meta.name == "bom"


def test_missing_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"configuration path not found: .*missing\.yaml"):
        read_config_paths([tmp_path / "missing.yaml"])


def test_non_utf8_file_is_an_input_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_config_paths([f])


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    """A Unix socket exists but cannot be opened as a file (ENXIO), even by root."""
    path = tmp_path / "sock.yaml"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        with pytest.raises(InputError, match=r"cannot read configuration file .*sock\.yaml: "):
            read_config_paths([path])


def test_directory_named_like_a_file_is_walked_and_dangling_symlink_is_missing(tmp_path: Path) -> None:
    d = tmp_path / "dir.yaml"
    d.mkdir()
    (d / "inner.yaml").write_text(NS.format("inner"))
    assert [Path(n).name for n, _ in read_config_paths([d])] == ["inner.yaml"]
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="configuration path not found"):
        read_config_paths([dangling])


def test_empty_directory_gives_no_files(tmp_path: Path) -> None:
    assert read_config_paths([tmp_path]) == []
