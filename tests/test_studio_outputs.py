"""studio.outputs and studio.status: the results folder, pruning it, and the page's progress text."""
from __future__ import annotations

import os
import time

from studio import outputs as O
from studio import status


def test_text_bar_and_times():
    assert status.text_bar(0, 10).count("█") == 0 and status.text_bar(10, 10).endswith("100 %")
    assert status.estimate_text(0.2) == "a second or two"
    assert status.estimate_text(75) == "about 1 min 15 s"


def _age(path, hours: float) -> None:
    old = time.time() - hours * 3600
    os.utime(path, (old, old))


def test_prune_deletes_only_the_apps_old_result_folders(tmp_path):
    """The outputs folder may be shared (a Space's /data): only marked run folders are ever deleted."""
    def run_folder(name: str, marked: bool = True):
        d = tmp_path / name
        d.mkdir()
        (d / "translation_grid.png").write_bytes(b"png")
        if marked:
            (d / O.RUN_MARKER).write_text("")
        return d

    old_run = run_folder("20240101-120000-0123abcd")
    young_run = run_folder("20991231-235959-89abcdef")
    unmarked = run_folder("20240101-120001-0123abce", marked=False)  # a user's folder that happens to match
    notes = tmp_path / "my_notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    hf = tmp_path / ".huggingface"
    (hf / "hub").mkdir(parents=True)
    (hf / "token").write_text("hf_x")
    loose = tmp_path / "20240101-120002-0123abcf"  # a file, not a folder
    loose.write_text("x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / O.RUN_MARKER).write_text("")
    link = tmp_path / "20240101-120003-0123abd0"
    link.symlink_to(target, target_is_directory=True)
    for p in (old_run, unmarked, notes, hf, loose, target):
        _age(p, 7)
    os.utime(link, (time.time() - 7 * 3600,) * 2, follow_symlinks=False)

    O.prune_outputs(tmp_path)
    assert not old_run.exists()
    assert young_run.is_dir() and unmarked.is_dir() and loose.is_file() and link.is_symlink()
    assert (notes / "todo.txt").read_text() == "keep me" and (hf / "token").is_file() and target.is_dir()
    assert O.foreign_entries(tmp_path) == sorted([notes, hf, target, unmarked, loose, link])


def test_unwritable_outputs_fall_back_to_a_temp_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert O.resolve_output_root({"ILVR_APP_OUTPUTS": str(tmp_path / "ok")}) == (tmp_path / "ok", None)
    assert (tmp_path / "ok").is_dir() and not list((tmp_path / "ok").iterdir())  # the write check cleans up
    bad = blocker / "outputs"  # cannot be made (and works the same when the tests run as root)
    folder, warning = O.resolve_output_root({"ILVR_APP_OUTPUTS": str(bad)})
    assert folder is not None and folder != bad and O.can_write_into(folder)
    assert f"ILVR_APP_OUTPUTS={bad}" in warning and str(folder) in warning
    folder.rmdir()

    def nowhere(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(O.tempfile, "mkdtemp", nowhere)
    folder, warning = O.resolve_output_root({"ILVR_APP_OUTPUTS": str(bad)})
    assert folder is None and "every run will fail until ILVR_APP_OUTPUTS names a writable folder" in warning
    monkeypatch.setattr(O.tempfile, "gettempdir", lambda: str(bad))  # TMPDIR read-only, ILVR_APP_OUTPUTS unset
    folder, warning = O.resolve_output_root({})
    assert folder is None and "TMPDIR" in warning
