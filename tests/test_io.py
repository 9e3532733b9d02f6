"""Atomic outputs: whole or absent, and readable by others the way a plain write would leave them."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tinyfusion_pl.io import (
    atomic_folder,
    atomic_path,
    begin_output_set,
    check_output_set,
    finish_output_set,
    remove_stray_temporaries,
    save_json,
    save_text,
)

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------- killed writers


def test_a_killed_writers_temporaries_are_removed_and_a_live_writers_kept(tmp_path):
    code = ("import os, signal, sys\nfrom tinyfusion_pl.io import atomic_folder, atomic_path\n"
            "folder = sys.argv[1]\n"
            "with atomic_path(folder + '/model.pt') as temporary, atomic_folder(folder + '/pruned') as temporary_folder:\n"
            "    temporary.write_bytes(b'half a checkpoint')\n"
            "    (temporary_folder / 'config.json').write_text('{')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "checkpoints").mkdir()
    for folder in (tmp_path, tmp_path / "checkpoints"):
        killed = subprocess.run([sys.executable, "-c", code, str(folder)], env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert killed.returncode == -signal.SIGKILL
    strays = sorted(path.name for path in tmp_path.rglob(".*"))
    assert len(strays) == 4 and all(".partial-" in name for name in strays)  # the killed writes, nothing renamed
    (tmp_path / ".hidden").write_text("a user's own dotfile")
    with atomic_path(tmp_path / "metrics.json") as in_progress:
        in_progress.write_text("{}")
        removed = remove_stray_temporaries(tmp_path, recursive=False) + remove_stray_temporaries(tmp_path)
        assert [path.parent for path in removed] == [tmp_path] * 2 + [tmp_path / "checkpoints"] * 2
        assert sorted(path.name for path in removed) == strays
        assert in_progress.exists()  # this process is alive: its write is left alone
    assert sorted(path.name for path in tmp_path.rglob("*")) == [".hidden", "checkpoints", "metrics.json"]


# ---------------------------------------------------------------------------------------- output sets


def write_set(folder, **files) -> None:
    begin_output_set(folder, "prune")
    for name, text in files.items():
        save_text(text, folder / name)
    finish_output_set(folder, "prune", files)


def test_a_complete_output_set_is_accepted_and_a_folder_without_manifest_taken_as_is(tmp_path):
    write_set(tmp_path, **{"pruned.pt": "weights", "decision.json": "{}"})
    manifest = check_output_set(tmp_path, "prune", ["pruned.pt", "decision.json"], fix="FIX")
    assert manifest["complete"] and set(manifest["files"]) == {"pruned.pt", "decision.json"}
    assert check_output_set(tmp_path / "elsewhere", "prune", ["pruned.pt"], fix="FIX") is None


def test_a_set_killed_half_way_over_an_older_one_is_refused_naming_the_files(tmp_path):
    write_set(tmp_path, **{"pruned.pt": "old weights", "decision.json": '{"kept_blocks": [0, 1]}'})
    begin_output_set(tmp_path, "prune")  # a new run starts writing, then is killed after one file
    save_text("new weights", tmp_path / "pruned.pt")
    with pytest.raises(ValueError, match=r"half-written stage=prune output.*decision.json, pruned.pt\)\. FIX"):
        check_output_set(tmp_path, "prune", ["pruned.pt"], fix="FIX")


def test_a_file_replaced_after_the_set_was_written_is_refused(tmp_path):
    write_set(tmp_path, **{"pruned.pt": "weights", "decision.json": "{}"})
    save_text('{"kept_blocks": [3]}', tmp_path / "decision.json")
    with pytest.raises(ValueError, match=r"not one consistent set \(decision.json changed since.*FIX"):
        check_output_set(tmp_path, "prune", ["pruned.pt"], fix="FIX")
    (tmp_path / "pruned.pt").unlink()
    with pytest.raises(ValueError, match=r"missing pruned.pt"):
        check_output_set(tmp_path, "prune", ["pruned.pt"], fix="FIX")
    with pytest.raises(ValueError, match=r"not the manifest of a stage=recover output"):
        check_output_set(tmp_path, "recover", ["model.pt"], fix="FIX")
