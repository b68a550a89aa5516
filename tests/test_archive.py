"""Archives between client and hosts unpack the same safe way on every Python, with
checks of our own (``tarfile``'s filters are missing before 3.10.12, 3.11.4 and 3.12)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from joblib_cloud.jobs.outputs import unpack
from joblib_cloud.wire.archive import UnsafeArchiveError, extract, safe_path

pytestmark = pytest.mark.compat


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x", mode: int = 0o644, mtime: int = 1_600_000_000):
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = mode, mtime
    return info, data


def _special(name: str, kind: bytes, linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def test_files_and_directories_come_back_with_their_times_and_safe_modes(tmp_path):
    directory = tarfile.TarInfo("results")
    directory.type = tarfile.DIRTYPE
    archive = _tar((directory, None), _file("results/model.txt", b"weights"),
                   _file("run.sh", b"#!/bin/sh\n", mode=0o4777))
    names = unpack(archive, tmp_path / "out")
    assert names == ["results/model.txt", "run.sh"]
    assert (tmp_path / "out/results/model.txt").read_bytes() == b"weights"
    assert os.stat(tmp_path / "out/results/model.txt").st_mtime == 1_600_000_000
    mode = stat.S_IMODE(os.stat(tmp_path / "out/run.sh").st_mode)
    assert mode == 0o755  # executable kept; set-uid and others' write dropped


@pytest.mark.parametrize("name", ["/etc/evil", "../evil", "a/../../evil", "a//b", "",
                                  "C:/evil", "\\\\server\\evil"])
def test_a_name_outside_the_target_is_refused(tmp_path, name):
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        unpack(_tar(_file(name)), tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_links_devices_and_fifos_are_left_out(tmp_path):
    archive = _tar(_special("link", tarfile.SYMTYPE, "/etc/passwd"),
                   _special("hard", tarfile.LNKTYPE, "/etc/passwd"),
                   _special("fifo", tarfile.FIFOTYPE), _file("kept.txt"))
    assert unpack(archive, tmp_path / "out") == ["kept.txt"]
    assert sorted(os.listdir(tmp_path / "out")) == ["kept.txt"]


def test_a_link_already_in_the_target_cannot_lead_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    into = tmp_path / "out"
    into.mkdir()
    (into / "escape").symlink_to(outside)
    with pytest.raises(UnsafeArchiveError, match="outside"):
        unpack(_tar(_file("escape/planted.txt")), into)
    assert not (outside / "planted.txt").exists()
    (into / "inner").mkdir()
    (into / "alias").symlink_to(into / "inner")  # a link that stays inside is fine
    assert unpack(_tar(_file("alias/ok.txt")), into) == ["alias/ok.txt"]
    assert (into / "inner/ok.txt").exists()


def test_a_stream_unpacks_as_the_host_reads_it(tmp_path):
    archive = _tar(_file("a.txt", b"1"), _file("sub/b.txt", b"2"))
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r|gz") as tar:
        assert extract(tar, str(tmp_path)) == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "sub/b.txt").read_bytes() == b"2"


def test_safe_path_serves_any_name_from_a_machine_or_bucket(tmp_path):
    assert safe_path(str(tmp_path), "a/b.txt") == str(Path(os.path.realpath(tmp_path),
                                                            "a/b.txt"))
    with pytest.raises(UnsafeArchiveError, match="shared file"):
        safe_path(str(tmp_path), "../.bashrc", what="shared file")


def test_an_archive_that_unpacks_past_the_cap_writes_nothing_more(tmp_path):
    bomb = _tar(_file("a.bin", b"\0" * 1000), _file("b.bin", b"\0" * 2_000_000))
    assert len(bomb) < 10_000  # compresses to almost nothing
    with pytest.raises(UnsafeArchiveError, match="more than 100000 bytes"):
        unpack(bomb, tmp_path / "out", max_bytes=100_000)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.bin"]
