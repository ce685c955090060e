"""The backup target check (``common.check_target_dir``) on real folders: who may write it decides."""

from __future__ import annotations

import os

import pytest

from workflows.errors import InvalidTarget
from workflows.strategies import common


def folder(base, name: str, mode: int, uid: int | None = None) -> str:
    path = base / name
    path.mkdir()
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)
    return str(path)


def test_private_and_sticky_folders_of_ours_are_accepted(tmp_path):
    assert common.check_target_dir(folder(tmp_path, "private", 0o700)) == str(tmp_path / "private")
    assert common.check_target_dir(folder(tmp_path, "shared-sticky", 0o1777)) == str(tmp_path / "shared-sticky")
    inner = tmp_path / "shared-sticky" / "inner"
    inner.mkdir(mode=0o755)
    assert common.check_target_dir(str(inner)) == str(inner)


def test_a_symlink_is_resolved_and_its_real_folder_checked(tmp_path):
    real = folder(tmp_path, "open", 0o777)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(InvalidTarget, match=f"{real} is writable by others"):
        common.check_target_dir(str(tmp_path / "link"))


@pytest.mark.parametrize("mode, uid, why", [
    (0o777, None, "is writable by others (mode 0777) without the sticky bit"),
    (0o775, None, "is writable by its group (mode 0775) without the sticky bit"),
    (0o755, 65534, "is owned by uid 65534, not by root or this user"),
    (0o1777, 65534, "is owned by uid 65534, not by root or this user"),
])
def test_a_folder_others_can_write_is_refused_in_one_line(tmp_path, mode, uid, why):
    if uid is not None and os.geteuid() != 0:
        pytest.fail("the chown cases need root (the test machine runs them as root)")
    path = folder(tmp_path, "t", mode, uid)
    with pytest.raises(InvalidTarget) as exc:
        common.check_target_dir(path)
    assert why in str(exc.value) and "\n" not in str(exc.value)
    inner = os.path.join(path, "inner")
    os.mkdir(inner, 0o700)
    with pytest.raises(InvalidTarget, match="refusing to write backups under it"):
        common.check_target_dir(inner)  # a private folder under it: its name can be swapped all the same
