"""Atomic outputs: whole or absent, and readable by others the way a plain write would leave them."""

import os
import stat

import pytest

from tinyfusion_pl.io import atomic_folder, save_json, save_text


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_permissions_of_a_plain_write(tmp_path, umask_022):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = save_json({"a": 1}, tmp_path / "metrics.json")
    assert mode(written) == mode(plain) == 0o644
    os.umask(0o077)  # a private umask stays private
    assert mode(save_text("y", tmp_path / "private.md")) == 0o600


def test_a_folder_is_replaced_whole_with_normal_permissions(tmp_path, umask_022):
    target = tmp_path / "pruned"
    with atomic_folder(target) as temporary:
        (temporary / "config.json").write_text("{}")
    assert mode(target) == 0o755 and mode(target / "config.json") == 0o644
    with pytest.raises(RuntimeError), atomic_folder(target) as temporary:
        (temporary / "config.json").write_text('{"half": true}')
        raise RuntimeError("killed mid-write")
    assert (target / "config.json").read_text() == "{}"  # the old folder is untouched
    assert [path.name for path in tmp_path.iterdir()] == ["pruned"]  # no stray temporary left


def test_a_failed_file_write_leaves_nothing(tmp_path, umask_022):
    with pytest.raises(TypeError):
        save_json({"not json": object()}, tmp_path / "broken.json")
    assert list(tmp_path.iterdir()) == []
