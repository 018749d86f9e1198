"""files.py: a folder or file appears under its name only once whole, and nothing a user put there is lost."""

from __future__ import annotations

import pytest

from tunesmith.core.files import atomic_folder, atomic_path, fresh_partial_folder, swap_in_folder


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "result"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as partial:
            (partial / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["result"] and (final / "old.txt").read_text() == "old"
    with atomic_folder(final, durable=True) as partial:
        (partial / "sub").mkdir()
        (partial / "sub" / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["result"]
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["sub", "sub/new.txt"]


def test_a_fixed_name_removes_what_a_killed_attempt_left(tmp_path):
    final = tmp_path / "step-00000003"
    leftover = fresh_partial_folder(final)
    (leftover / "torn.pt").write_bytes(b"half")
    with atomic_folder(final, fixed_name=True) as partial:
        assert partial == leftover and not any(partial.iterdir())
        (partial / "state.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def test_only_empty_never_removes_what_a_user_put_there(tmp_path):
    final, partial = tmp_path / "out", fresh_partial_folder(tmp_path / "out")
    final.mkdir()
    (final / "mine.txt").write_text("a user's file")
    with pytest.raises(OSError):
        swap_in_folder(partial, final, only_empty=True)
    assert (final / "mine.txt").read_text() == "a user's file"
    (final / "mine.txt").unlink()
    (partial / "model.gguf").write_bytes(b"GGUF")
    swap_in_folder(partial, final, only_empty=True)
    assert [p.name for p in final.iterdir()] == ["model.gguf"] and not partial.exists()


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    final = tmp_path / "manifest.json"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as partial:
            partial.write_text("ne")
            raise RuntimeError("interrupted")
    assert final.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
