"""What every kernel-only install does with a wheel: refuse unsafe archive members, find the
METADATA member, hash the wheel, and swap a finished install into place atomically. Shared by
:mod:`lib.tools.vllm_install` and :mod:`lib.tools.flashinfer_install`."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from lib.engine.backends.vllm import canonical_name


def unsafe_member(info: zipfile.ZipInfo | str) -> str | None:
    """Why an archive member must not be extracted (absolute, drive, '..', link, odd name), or None."""
    name = info.filename if isinstance(info, zipfile.ZipInfo) else info
    if not name or "\x00" in name:
        return "empty or NUL-containing name"
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        return "absolute path"
    if PureWindowsPath(name).drive:
        return "drive letter"
    if ".." in re.split(r"[/\\]", name):
        return "'..' component"
    if isinstance(info, zipfile.ZipInfo) and stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def check_members(zf: zipfile.ZipFile, label: str) -> list[str]:
    """Every member name of `zf`, after refusing the archive on the first unsafe one."""
    for info in zf.infolist():
        why = unsafe_member(info)
        if why:
            raise ValueError(f"refusing {label}: member {info.filename!r} is unsafe ({why})")
    return zf.namelist()


def find_metadata(names: Iterable[str], dist: str, label: str) -> str:
    """The wheel's ``<dist>-<ver>.dist-info/METADATA`` member."""
    found = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)
             and canonical_name(n.split("/")[0].split("-", 1)[0]) == canonical_name(dist)]
    if len(found) != 1:
        raise ValueError(f"{label} is not a wheel of {dist}: expected one {canonical_name(dist)}-"
                         f"<version>.dist-info/METADATA, found {found or 'none'}")
    return found[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def swap_in(staging: Path, dest: Path) -> None:
    """Put the finished install `staging` at `dest`, replacing an earlier one: a reader sees the
    old install or the new one, never a half-written directory."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / "x")
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)
