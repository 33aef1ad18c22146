"""The output manifest (study/io.py): a guarded write replaces only files that the suite wrote."""
from __future__ import annotations

import json

import pytest

from study.errors import UserError
from study.io import MANIFEST, atomic_write_text, record_written, refuse_foreign, written_by_suite


def test_guarded_write_records_and_may_replace_its_own_file(tmp_path):
    out = tmp_path / "index.md"
    atomic_write_text(out, "first", guard=True)
    assert written_by_suite(out) and json.loads((tmp_path / MANIFEST).read_text())["written"] == ["index.md"]
    atomic_write_text(out, "second", guard=True)
    assert out.read_text() == "second"


def test_guarded_write_refuses_a_users_file_and_leaves_it(tmp_path):
    out = tmp_path / "index.md"
    out.write_text("my notes")
    with pytest.raises(UserError, match="did not write.*index.md|index.md.*did not write"):
        atomic_write_text(out, "report", guard=True)
    assert out.read_text() == "my notes" and not written_by_suite(out)
    atomic_write_text(out, "report")  # an unguarded write is the caller's decision (run folders' own records)
    assert out.read_text() == "report"


def test_refuse_foreign_before_another_librarys_writer(tmp_path):
    fig = tmp_path / "fig.png"
    refuse_foreign(fig)  # absent: fine
    fig.write_bytes(b"x")
    with pytest.raises(UserError, match="fig.png"):
        refuse_foreign(fig)
    record_written(fig)
    refuse_foreign(fig)  # now listed


def test_a_damaged_manifest_lists_nothing(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError):
        refuse_foreign(tmp_path / "a.csv")
    record_written(tmp_path / "a.csv")
    assert written_by_suite(tmp_path / "a.csv")


def test_a_folder_the_suite_wrote_before_manifests_is_adopted_by_its_marker(tmp_path):
    """`make study`'s report folder from before the manifest: its own .inputs stamp marks it as the suite's,
    so running again replaces its files; a folder without the marker stays protected."""
    from study.io import adopt_earlier_output

    old = tmp_path / "report"
    old.mkdir()
    (old / ".inputs").write_text("key\n")
    (old / "index.md").write_text("old report")
    assert adopt_earlier_output(old, ".inputs") == old / ".inputs"
    atomic_write_text(old / "index.md", "new report", guard=True)
    assert (old / "index.md").read_text() == "new report"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.md").write_text("my notes")
    adopt_earlier_output(mine, ".inputs")
    with pytest.raises(UserError):
        atomic_write_text(mine / "index.md", "report", guard=True)
