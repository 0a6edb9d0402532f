"""The guards and feedback around a generation (minisd/runtime.py) and where models are found
(minisd/folders.py)."""
import io
import os
import time

from minisd.folders import newest_snapshot
from minisd.runtime import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_in_place_on_a_terminal():
    out = Terminal()
    bar = ProgressBar(3, stream=out)
    for _ in range(3):
        bar.update()
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "  3/3 [" + "#" * 30 + "]" in text and "s/step" in text


def test_progress_bar_writes_lines_into_a_log_at_most_every_interval():
    out = io.StringIO()  # not a terminal
    bar = ProgressBar(1000, label="unet", done=10, stream=out, min_interval=3600)
    for step in range(11, 1001):
        bar.update(step, loss=0.25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first line, then (an hour not having passed) only the last
    assert lines[0].startswith("unet  11/1000 [") and lines[-1].startswith("unet 1000/1000 [")
    assert "loss 0.25," in lines[-1] and "\r" not in out.getvalue()


def test_progress_bar_disabled_writes_nothing():
    out = Terminal()
    bar = ProgressBar(2, enabled=False, stream=out)
    bar.update()
    bar.close()
    assert out.getvalue() == ""


def test_newest_snapshot_prefers_what_refs_main_names_and_skips_incomplete_ones(tmp_path):
    entry = tmp_path / "models--org--name"
    assert newest_snapshot(entry) is None
    old, new, partial = (entry / "snapshots" / name for name in ("aaa", "bbb", "ccc"))
    for i, snapshot in enumerate((old, new, partial)):
        snapshot.mkdir(parents=True)
        os.utime(snapshot, (time.time() - 100 + 10 * i,) * 2)
    for complete in (old, new):
        (complete / "model_index.json").write_text("{}")
    assert newest_snapshot(entry) == new  # the newest that holds model_index.json, not `partial`
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("aaa\n")
    assert newest_snapshot(entry) == old  # what refs/main names wins
    (entry / "refs" / "main").write_text("ccc")  # names a half-downloaded snapshot
    assert newest_snapshot(entry) == new
