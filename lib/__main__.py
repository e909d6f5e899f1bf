"""Command line: ``python -m lib <command>`` (also installed as ``uvm-study``).

    sweep <experiment> [-p k=v ...] [--shard i/n] [--devices 0,1] [--force] [--out DIR]
    list [experiment]          experiments, their grids and sizes
    env [--json]               GPU, driver, libraries, and what is missing for what
    merge <experiment>         fold part files (cluster shards) into the main results file
    reproduce [chapters...] [-p name value ...] [--mode run|replay]
    wheelhouse [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--dest wheelhouse]
    vllm-kernel ...            kernel-only vLLM install (see lib.engine.backends.vllm)

Usage errors (unknown experiment or parameter, bad shard) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lib import ROOT, catalog

# What a GPU node needs beyond a stock CUDA PyTorch image with CuPy (torch, triton, cupy, numpy,
# pandas, matplotlib, seaborn, nvidia-ml-py come with it): running chapters through papermill.
RUN_PACKAGES = ["papermill>=2.6", "jupytext>=1.16", "nbclient", "nbformat", "ipykernel>=6.29", "tqdm>=4.66"]
# ... and rebuilding the book there (`reproduce` ends with a build unless --no-build).
BOOK_PACKAGES = ["jupyter-book==1.0.4.post1"]


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------------- sweep, list, merge

def cmd_sweep(args) -> int:
    from lib.harness import experiments as E
    from lib.harness import sweep

    exp = catalog.get(args.experiment)
    overrides = E.parse_params(exp, args.param or [])
    shard = E.parse_shard(args.shard) if args.shard else None
    devices = sweep._check_devices(args.devices) if args.devices else None
    summary = sweep.run_sweep(exp, overrides, shard=shard, devices=devices, force=args.force,
                              workers_per_device=args.workers_per_device,
                              out_dir=args.out, progress=not args.no_progress)
    print(summary.line())
    return 0 if summary.completed else 1


def cmd_list(args) -> int:
    from lib.harness import experiments as E

    names = [catalog.get(args.experiment).name] if args.experiment else sorted(catalog.EXPERIMENTS)
    for name in names:
        exp = catalog.EXPERIMENTS[name]
        where = f"  chapter: {exp.chapter}" if exp.chapter else ""
        print(f"{name}  ({exp.size()} points, {'GPU' if exp.gpu else 'CPU'}){where}")
        print(f"  {exp.description}")
        for i, g in enumerate(exp.subgrids):
            if len(exp.subgrids) > 1:
                print(f"  grid {i + 1}:")
            for k, v in g.items():
                print(f"    {k} = {','.join(E._fmt(x) for x in v)}")
        if exp.where is not None:
            print("    (points filtered by a 'where' rule)")
        print(f"  measure: {exp.measure}")
    return 0


def cmd_merge(args) -> int:
    from lib.harness import results as R

    exp_dir = R.results_root(args.out) / args.experiment
    if not exp_dir.is_dir():
        raise UsageError(f"no results directory {exp_dir}")
    mains = sorted({R._main_of(p) for p in exp_dir.glob("*.part-*.csv")})
    if not mains:
        print(f"{args.experiment}: no part files to merge")
    for main in mains:
        n = R.merge_parts(main)
        print(f"{main}: merged {n} rows")
    return 0


# ----------------------------------------------------------------------------- env

def env_report() -> dict:
    from lib.harness import provenance
    from lib.engine.gpu import gpu_available

    libs = provenance.library_versions()
    gpu = provenance.gpu_info() if gpu_available() else None
    need = {
        "book (build from committed data)": ["jupyter-book", "jupytext", "papermill", "ipykernel", "pandas", "tqdm"],
        "gpu (measure)": ["cupy", "nvidia-ml-py"],
        "vLLM's kernel": ["torch", "triton", "vllm"],
        "dense SDPA peer": ["torch"],
    }
    missing = {what: [p for p in pkgs if libs.get(p) is None] for what, pkgs in need.items()}
    vllm = None
    try:
        from lib.engine.backends import vllm as vllm_kernels

        vllm = vllm_kernels.vllm_status()
    except Exception as e:  # absent module or a broken install: report, don't fail
        vllm = {"error": f"{type(e).__name__}: {e}"}
    if vllm and isinstance(vllm, dict) and libs.get("vllm") is None and vllm.get("available"):
        missing["vLLM's kernel"] = [p for p in missing["vLLM's kernel"] if p != "vllm"]
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "gpu": gpu,
        "snapshot": provenance.snapshot() if gpu else None,
        "libraries": libs,
        "vllm_kernel": vllm,
        "missing": missing,
        "git": provenance.git_state(),
    }


def cmd_env(args) -> int:
    rep = env_report()
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
        return 0
    print(f"python      {rep['python']}  ({rep['executable']})")
    g = rep["gpu"]
    if g is None:
        print("gpu         none visible (chapters replay committed data; sweeps of GPU experiments need one)")
    else:
        print(f"gpu         {g['name']}  (cc {g['compute_capability']}, {g['sm_count']} SMs, "
              f"{(g['memory_total_bytes'] or 0) / 2**30:.0f} GiB, L2 {(g['l2_cache_bytes'] or 0) / 2**20:.0f} MiB)")
        print(f"driver      {g['driver_version']}  CUDA driver {g['cuda_driver_version']}, runtime {g['cuda_runtime_version']}")
        s = rep["snapshot"] or {}
        if s:
            print(f"clocks      SM {s.get('sm_clock_mhz')} MHz, memory {s.get('mem_clock_mhz')} MHz, "
                  f"{s.get('temperature_c')} C, {s.get('power_w')} W")
    git = rep["git"]
    print(f"git         {git['commit'] or 'no git'}{' (dirty)' if git['dirty'] else ''}")
    print("libraries")
    for k, v in rep["libraries"].items():
        print(f"  {k:<14}{v or '-- missing'}")
    v = rep["vllm_kernel"]
    if isinstance(v, dict):
        print(f"vllm kernel {json.dumps(v, default=str)[:300]}")
    print("missing")
    for what, pkgs in rep["missing"].items():
        print(f"  {what:<34}{', '.join(pkgs) if pkgs else 'nothing'}")
    return 0


# ----------------------------------------------------------------------------- reproduce

def _literal(text: str):
    """A -p value: int, float, bool or None when it reads as one, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _coerce_param(text: str, default):
    """A -p value as the type of the chapter's default (a string default keeps "1,2" a string)."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"{text!r} is not a bool")
        return low in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise UsageError(f"{text!r} is not a {type(default).__name__}") from None
    return _literal(text)


def _declared_parameters(nb) -> dict:
    """Names assigned in the notebook's ``parameters`` cell, with their literal defaults."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            out = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        if isinstance(t, ast.Name):
                            try:
                                out[t.id] = ast.literal_eval(node.value)
                            except Exception:
                                out[t.id] = None
            return out
    return {}


def experiment_chapters() -> list[Path]:
    """Chapters that run experiments (those the registry names), in book order where known."""
    from lib.harness import experiments as E

    import re

    named = {Path(e.chapter).with_suffix(".md").as_posix() for e in catalog.EXPERIMENTS.values() if e.chapter}
    toc = ROOT / "_toc.yml"
    order = re.findall(r"file:\s*(\S+)", toc.read_text()) if toc.exists() else []
    rank = {Path(f).with_suffix(".md").as_posix(): i for i, f in enumerate(order)}
    ordered = sorted(named, key=lambda c: (rank.get(c, len(rank)), c))
    return [ROOT / c for c in ordered if (ROOT / c).exists()]


def _chapter_path(text: str) -> Path:
    p = Path(text)
    cands = [p, ROOT / p, ROOT / "chapters" / p, ROOT / "chapters" / f"{p}.md", (ROOT / p).with_suffix(".md")]
    for c in cands:
        if c.is_file():
            return c.resolve()
    raise UsageError(f"no chapter {text!r} (looked in {ROOT / 'chapters'})")


def cmd_reproduce(args) -> int:
    import jupytext
    import nbformat
    import papermill

    chapters = [_chapter_path(c) for c in args.chapters] if args.chapters else experiment_chapters()
    if not chapters:
        raise UsageError("no experiment chapters registered yet; name chapters explicitly")
    notebooks = [(c, jupytext.read(c)) for c in chapters]
    declared = {c: _declared_parameters(nb) for c, nb in notebooks}
    user = {}
    for name, value in args.param or []:
        if not name.isidentifier():
            raise UsageError(f"parameter name {name!r} is not an identifier")
        defaults = [d[name] for d in declared.values() if name in d]
        if not defaults:
            known = sorted({k for d in declared.values() for k in d})
            raise UsageError(f"parameter {name!r} is declared by none of {[c.name for c in chapters]} (they declare {known})")
        user[name] = _coerce_param(value, defaults[0])
    out_dir = Path(args.out) if args.out else ROOT / "_executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    # the kernel imports `lib` from this checkout, whatever is installed
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
    failed = []
    for chapter, nb in notebooks:
        params = {k: v for k, v in {"mode": args.mode, **user}.items() if k in declared[chapter]}
        if "mode" not in declared[chapter]:
            print(f"{chapter.name}: declares no 'mode' parameter; running it as it is", file=sys.stderr)
        src = out_dir / f"{chapter.stem}.source.ipynb"
        dst = out_dir / f"{chapter.stem}.ipynb"
        nbformat.write(nb, src)
        print(f"{chapter.relative_to(ROOT) if chapter.is_relative_to(ROOT) else chapter}: "
              f"papermill {params} -> {dst}", file=sys.stderr)
        try:
            papermill.execute_notebook(
                str(src), str(dst), parameters=params, cwd=str(chapter.parent),
                kernel_name=args.kernel, progress_bar=not args.no_progress,
                execution_timeout=args.timeout,
            )
        except papermill.PapermillExecutionError as e:
            failed.append(f"{chapter.name}: {e.ename}: {e.evalue}")
        finally:
            src.unlink(missing_ok=True)
    if failed:
        print("failed chapters (executed notebooks kept for inspection):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    if not args.no_build:
        return _build_book()
    return 0


def _build_book() -> int:
    exe = Path(sys.executable).with_name("jupyter-book")
    exe = str(exe) if exe.exists() else shutil.which("jupyter-book")
    if not exe:
        raise UsageError("jupyter-book is not installed (pip install '.[book]'); rerun with --no-build")
    return subprocess.run([exe, "build", str(ROOT), "-W", "--keep-going"]).returncode


# ----------------------------------------------------------------------------- wheelhouse

def platform_tags(platform: str) -> list[str]:
    """pip's --platform values for a target: a manylinux_2_Y tag also accepts every older glibc
    (pip does not expand these itself)."""
    import re

    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    y, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{v}_{arch}" for v in range(y, 16, -1)]
    if y >= 17 and arch in ("x86_64", "i686", "aarch64", "ppc64le", "s390x", "armv7l"):
        tags.append(f"manylinux2014_{arch}")
    if y >= 12 and arch in ("x86_64", "i686"):
        tags += [f"manylinux2010_{arch}"]
    if y >= 5 and arch in ("x86_64", "i686"):
        tags += [f"manylinux1_{arch}"]
    return tags


_INSTALL_SH = """#!/usr/bin/env sh
# Installs this wheelhouse into the Python environment of an offline GPU node (no index needed).
#   sh {dest}/install.sh            # uses python3, or set PYTHON=/path/to/python
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
PY="${{PYTHON:-python3}}"
"$PY" -m pip install --no-index --find-links "$here" -r "$here/requirements.txt"
if [ -d "$here/vllm-kernel" ]; then
  echo "vLLM kernel-only install: export UVM_STUDY_VLLM_DIR=$here/vllm-kernel"
  echo "  (or copy it to <repo>/.vllm-kernel)"
fi
"$PY" -m lib env 2>/dev/null || echo "now run: $PY -m lib env (from the repository) to check"
"""


def _target_python(version: str) -> str:
    """An interpreter of the target version with pip, else this one."""
    if ".".join(map(str, sys.version_info[:2])) == version:
        return sys.executable
    exe = shutil.which(f"python{version}")
    if exe:
        try:
            r = subprocess.run([exe, "-m", "pip", "--version"], capture_output=True, timeout=60)
            if r.returncode == 0:
                return exe
        except (OSError, subprocess.SubprocessError):
            pass
    return sys.executable


def cmd_wheelhouse(args) -> int:
    dest = Path(args.dest).resolve()
    packages = list(RUN_PACKAGES) + ([] if args.no_book else list(BOOK_PACKAGES)) + list(args.with_ or [])
    notes = []
    if args.vllm_wheel and not args.dry_run:
        try:
            from lib.engine.backends import vllm as vllm_kernels
        except ImportError as e:
            raise UsageError(f"lib.engine.backends.vllm is not available ({e}); cannot make the kernel-only install") from None
        rep = vllm_kernels.install_kernel_only(Path(args.vllm_wheel), dest / "vllm-kernel",
                                               **({"python": args.vllm_python} if args.vllm_python else {}))
        packages += [p for p in rep.third_party if p not in packages]
        notes.append(f"vLLM {rep.version} kernel-only install: {len(rep.files)} files in {rep.dest}")
    # pip evaluates dependency markers (python_version < "3.11", ...) with the interpreter that
    # runs it, so use the target version's interpreter when this machine has one
    py = _target_python(args.python_version)
    host = ".".join(map(str, sys.version_info[:2])) if py == sys.executable else args.python_version
    if host != args.python_version:
        notes.append(f"note: pip ran under Python {host}; dependencies behind python_version markers "
                     f"follow {host}, not {args.python_version} (install python{args.python_version} to avoid this)")
    cmd = [py, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", args.python_version, "--implementation", "cp"]
    for tag in platform_tags(args.platform):
        cmd += ["--platform", tag]
    cmd += packages
    if args.dry_run:
        print(" ".join(cmd))
        for n in notes:
            print(n, file=sys.stderr)
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"error: pip download failed (exit {rc})", file=sys.stderr)
        return rc
    (dest / "requirements.txt").write_text(
        "# top-level packages; pip takes their dependencies from this directory or the environment\n"
        + "\n".join(packages) + "\n"
    )
    (dest / "install.sh").write_text(_INSTALL_SH.format(dest=dest.name))
    (dest / "install.sh").chmod(0o755)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"{len(wheels)} wheels ({size:.1f} MB) for CPython {args.python_version} on {args.platform} in {dest}")
    for n in notes:
        print(n)
    print(f"copy {dest.name}/ and this repository to the node, then: sh {dest.name}/install.sh")
    return 0


# ----------------------------------------------------------------------------- entry

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib", description="UVM x PagedAttention study: measure, list, rerun.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    s = sub.add_parser("sweep", help="measure an experiment's grid (resumes; appends rows as it goes)")
    s.add_argument("experiment")
    s.add_argument("-p", "--param", action="append", metavar="K=V", help="override a parameter: k=v or k=v1,v2 (repeatable)")
    s.add_argument("--shard", metavar="I/N", help="run shard I of N (0-based, round-robin): for array jobs")
    s.add_argument("--devices", metavar="0,1,..", help="one worker process per listed GPU")
    s.add_argument("--workers-per-device", type=int, default=1, metavar="N",
                   help="N processes share each GPU (only experiments that time nothing)")
    s.add_argument("--force", action="store_true", help="measure points that already have rows again")
    s.add_argument("--out", metavar="DIR", help="results root (default data/results)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("list", help="experiments, their grids and sizes")
    s.add_argument("experiment", nargs="?")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("env", help="GPU, driver, libraries, and what is missing (works without a GPU)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_env)

    s = sub.add_parser("merge", help="merge part files (cluster shards) into the main results file")
    s.add_argument("experiment")
    s.add_argument("--out", metavar="DIR", help="results root (default data/results)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("reproduce", help="run chapters through papermill (mode=run), then rebuild the book")
    s.add_argument("chapters", nargs="*", help="chapter names or paths (default: every experiment chapter)")
    s.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"), help="chapter parameter (repeatable)")
    s.add_argument("--mode", choices=("run", "replay"), default="run")
    s.add_argument("--out", metavar="DIR", help="executed notebooks (default _executed/)")
    s.add_argument("--no-build", action="store_true", help="do not rebuild the book afterwards")
    s.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    s.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_reproduce)

    s = sub.add_parser("wheelhouse", help="wheels (and kernel-only vLLM) for an offline GPU node")
    s.add_argument("--python-version", default="3.12", help="target CPython version (default 3.12)")
    s.add_argument("--platform", default="manylinux_2_28_x86_64", help="target platform tag")
    s.add_argument("--dest", default=str(ROOT / "wheelhouse"))
    s.add_argument("--vllm-wheel", metavar="PATH", help="a vllm-*.whl: add its kernel-only install")
    s.add_argument("--vllm-python", metavar="PYTHON", help="python with torch+triton for the kernel-only probe")
    s.add_argument("--with", dest="with_", action="append", metavar="PKG", help="one more package (repeatable)")
    s.add_argument("--no-book", action="store_true", help="leave out jupyter-book (no book rebuild on the node)")
    s.add_argument("--dry-run", action="store_true", help="print the pip command only")
    s.set_defaults(func=cmd_wheelhouse)

    sub.add_parser("vllm-kernel", help="kernel-only vLLM install (python -m lib vllm-kernel --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vllm-kernel":
        try:
            from lib.engine.backends import vllm as vllm_kernels
        except ImportError as e:
            print(f"error: the vllm-kernel command needs lib/engine/backends/vllm.py ({e})", file=sys.stderr)
            return 2
        return int(vllm_kernels.cli(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # usage errors: unknown experiment/parameter, bad shard, bad values
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rows measured so far are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from lib.harness.sweep import NeedsGPU

        if isinstance(e, NeedsGPU):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
