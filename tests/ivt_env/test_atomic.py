import os
import stat

import pytest

from ivt_env.atomic import atomic_dir, atomic_open, atomic_write_text


def test_atomic_open_replaces_whole_file_and_keeps_old_on_crash(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "first")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half-writ")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "first"  # the crash left the old content, not a partial file
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & stat.S_IRGRP  # readable like any other file (mkstemp alone would give 0600)


def test_atomic_dir_swaps_in_complete_folder(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise ValueError("crash")
    assert (out / "w.bin").read_bytes() == b"1"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"3")
    assert (out / "w.bin").read_bytes() == b"3"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
