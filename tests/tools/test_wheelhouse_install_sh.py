"""The wheelhouse's install.sh, run for real with a stand-in python: one command on an offline
node installs the wheels and puts the kernel-only installs where the backends look."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lib.tools import wheelhouse

pytestmark = pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")


def _node(tmp_path: Path, kinds=("vllm", "flashinfer")) -> tuple[Path, Path, Path]:
    """A repository checkout with a wheelhouse in it, and a fake python that logs its calls."""
    repo = tmp_path / "repo"
    (repo / "lib").mkdir(parents=True)
    (repo / "lib" / "__main__.py").write_text("")
    wh = repo / "wheelhouse"
    wh.mkdir()
    (wh / "install.sh").write_text(wheelhouse.INSTALL_SH.format(dest="wheelhouse"))
    (wh / "requirements.txt").write_text("ninja\n")
    for kind in kinds:
        (wh / f"{kind}-kernel").mkdir()
    log = tmp_path / "calls.log"
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    py.chmod(0o755)
    return repo, wh, py


def _run(wh: Path, py: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(py)}
    return subprocess.run(["sh", str(wh / "install.sh")], env=env, capture_output=True, text=True,
                          cwd=wh.parent, timeout=30)


def test_one_command_installs_offline_and_links_both_kernels(tmp_path):
    repo, wh, py = _node(tmp_path)
    r = _run(wh, py)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("-m pip install --no-index --find-links")  # never an index
    assert calls[-1] == "-m lib env"
    for kind in ("vllm", "flashinfer"):
        link = repo / f".{kind}-kernel"
        assert link.is_symlink() and link.resolve() == (wh / f"{kind}-kernel").resolve()
        assert f"linked {repo}/.{kind}-kernel" in r.stdout
    assert "FLASHINFER_WORKSPACE_BASE" in r.stdout
    again = _run(wh, py)  # a second run keeps the links and says so
    assert again.returncode == 0 and again.stdout.count("is this one") == 2


def test_an_existing_install_is_left_alone_with_the_way_to_choose(tmp_path):
    repo, wh, py = _node(tmp_path, kinds=("flashinfer",))
    (repo / ".flashinfer-kernel").mkdir()  # another install the user made
    r = _run(wh, py)
    assert r.returncode == 0, r.stderr
    assert not (repo / ".flashinfer-kernel").is_symlink()
    assert f"export UVM_STUDY_FLASHINFER_DIR={wh}/flashinfer-kernel" in r.stdout
    assert not (repo / ".vllm-kernel").exists() and "vllm" not in r.stdout
