"""A full disk is one line with the space needed, leaves no temporary file, and the same command then finishes."""

import errno
import shutil

import pytest
import torch

from core import files
from core.errors import CladError
from core.files import remove_stale_temps, save_torch_atomic, temp_name, write_atomic


def test_enospc_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt" / "final.pt"
    disk = {"full": True}

    def write(fh):
        fh.write(b"x" * 3 * 2**20)
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CladError, match=r"no space left on the device writing .*final\.pt \(needs at least 3\.0 MiB"):
        files.write_with(target, write)
    assert list(target.parent.iterdir()) == []
    disk["full"] = False  # space is back: the very same write now lands whole
    files.write_with(target, write)
    assert target.stat().st_size == 3 * 2**20 and list(target.parent.iterdir()) == [target]


def test_torch_enforce_failure_on_a_full_disk_names_the_space(tmp_path, monkeypatch):
    def torch_full(obj, fh):
        fh.write(b"y" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))  # 0 B free
    with pytest.raises(CladError, match="no space left on the device"):
        save_torch_atomic({"w": 1}, tmp_path / "latest.pt")
    assert not any(p.name.startswith(".latest.pt.tmp") for p in tmp_path.iterdir())


def test_other_failures_keep_their_error(tmp_path):
    with pytest.raises(ZeroDivisionError):
        files.write_with(tmp_path / "a.json", lambda fh: 1 / 0)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    write_atomic(tmp_path / "keep.json", "{}")
    mine = temp_name(tmp_path / "latest.pt")
    mine.write_bytes(b"in progress")  # this process is alive: kept
    dead = tmp_path / ".final.pt.tmp-999999999"
    dead.write_bytes(b"x" * 100)
    fig = tmp_path / "figures" / ".roc.tmp-999999999.png"
    fig.parent.mkdir()
    fig.write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, fig]) and mine.exists() and (tmp_path / "keep.json").exists()
