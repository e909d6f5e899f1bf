"""Command line: ``python -m lib <command>`` (also installed as ``uvm-study``).

Commands: sweep, list, env, merge, reproduce, wheelhouse, vllm-kernel, vllm2024-kernel, flashinfer-kernel
(``<command> --help`` says more). Usage errors (unknown experiment or parameter, bad shard) print
one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from lib import ROOT, catalog

SWEEP_EXAMPLES = """examples:
  python -m lib sweep correctness --workers-per-device 16        # the whole matrix
  python -m lib sweep correctness -p dtype=float16 -p block_size=1,16,256 -p head_size=80,128 \\
      --out /tmp/quick                                            # a quick subset, kept out of data/
"""


def cmd_sweep(args) -> int:
    from lib.harness import experiments as E
    from lib.harness import sweep

    exp = catalog.get(args.experiment)
    summary = sweep.run_sweep(exp, E.parse_params(exp, args.param or []),
                              shard=E.parse_shard(args.shard) if args.shard else None, devices=args.devices,
                              force=args.force, workers_per_device=args.workers_per_device, out_dir=args.out,
                              progress=not args.no_progress)
    print(summary.line())
    return 0 if summary.completed else 1


def cmd_list(args) -> int:
    from lib.harness.experiments import _fmt

    for name in [catalog.get(args.experiment).name] if args.experiment else sorted(catalog.EXPERIMENTS):
        exp = catalog.EXPERIMENTS[name]
        where = f"  chapter: {exp.chapter}" if exp.chapter else ""
        print(f"{name}  ({exp.size()} points, {'GPU' if exp.gpu else 'CPU'}){where}")
        print(f"  {exp.description}")
        for i, g in enumerate(exp.subgrids):
            if len(exp.subgrids) > 1:
                print(f"  grid {i + 1}:")
            for k, v in g.items():
                print(f"    {k} = {','.join(_fmt(x) for x in v)}")
        if exp.where is not None:
            print("    (points filtered by a 'where' rule)")
        print(f"  measure: {exp.measure}")
    return 0


def cmd_merge(args) -> int:
    from lib.harness import results as R

    exp_dir = R.results_root(args.out) / args.experiment
    if not exp_dir.is_dir():
        raise ValueError(f"no results directory {exp_dir}")
    mains = sorted({R._main_of(p) for p in exp_dir.glob("*.part-*.csv")})
    if not mains:
        print(f"{args.experiment}: no part files to merge")
    for main in mains:
        print(f"{main}: merged {R.merge_parts(main)} rows")
    return 0


def cmd_env(args) -> int:
    from lib.harness import provenance

    rep = provenance.environment()
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
    print(f"vllm kernel {json.dumps(rep['vllm_kernel'], default=str)[:300]}")
    print("missing")
    for what, pkgs in rep["missing"].items():
        print(f"  {what:<34}{', '.join(pkgs) if pkgs else 'nothing'}")
    return 0


def experiment_chapters():
    """Chapters that run experiments (those the catalog names), in book order."""
    from lib.tools.reproduce import in_book_order

    return in_book_order(e.chapter for e in catalog.EXPERIMENTS.values() if e.chapter)


def cmd_reproduce(args) -> int:
    from lib.tools import reproduce as P

    chapters = [P.chapter_path(c) for c in args.chapters] if args.chapters else experiment_chapters()
    return P.reproduce(chapters, args.param, mode=args.mode, out=args.out, build=not args.no_build,
                       kernel=args.kernel, progress=not args.no_progress, timeout=args.timeout)


def cmd_wheelhouse(args) -> int:
    from lib.tools import wheelhouse

    return wheelhouse.build(args.dest, python_version=args.python_version, platform=args.platform,
                            book=not args.no_book, sweeps_only=args.sweeps_only, vllm_flash_attn=args.vllm_flash_attn,
                            vllm2024=args.vllm2024, extra=args.with_ or (), vllm_wheel=args.vllm_wheel,
                            vllm_python=args.vllm_python, flashinfer_wheel=args.flashinfer_wheel,
                            tvm_ffi_wheel=args.tvm_ffi_wheel, flashinfer_version=args.flashinfer,
                            flashinfer_python=args.flashinfer_python, dry_run=args.dry_run)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib", description="UVM x PagedAttention study: measure, list, rerun.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    s = sub.add_parser("sweep", help="measure an experiment's grid (resumes; appends rows as it goes)",
                       epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("experiment")
    s.add_argument("-p", "--param", action="append", metavar="K=V",
                   help="override a parameter: k=v or k=v1,v2 (repeatable; -p K V is an alias)")
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
    s.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="chapter parameter, as for sweep (repeatable; -p NAME VALUE is an alias; "
                        "-p force=1 measures points that have rows again, as a new run)")
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
    s.add_argument("--flashinfer", metavar="VERSION", nargs="?", const="0.7.2.post1",
                   help="add a kernel-only FlashInfer install, downloading its wheels (default 0.7.2.post1)")
    s.add_argument("--flashinfer-wheel", metavar="PATH", help="... or from this flashinfer_python-*.whl")
    s.add_argument("--tvm-ffi-wheel", metavar="PATH", help="the apache_tvm_ffi-*.whl for the node's python")
    s.add_argument("--flashinfer-python", metavar="PYTHON", help="python with torch for FlashInfer's probe (needs nvcc here)")
    s.add_argument("--with", dest="with_", action="append", metavar="PKG", help="one more package (repeatable)")
    s.add_argument("--no-book", action="store_true", help="leave out jupyter-book (no book rebuild on the node)")
    s.add_argument("--vllm-flash-attn", action="store_true",
                   help="with --vllm-wheel: add vLLM's FlashAttention 3 (vllm-fa3 backend, +172 MB)")
    s.add_argument("--vllm2024", metavar="VERSION", nargs="?", const="0.3.3",
                   help="add vLLM's sdist (default 0.3.3): install.sh builds its 2024 kernels (vllm2024 backends)")
    s.add_argument("--sweeps-only", action="store_true",
                   help="only what `python -m lib sweep` needs (no papermill, no book): a measuring node")
    s.add_argument("--dry-run", action="store_true", help="print the pip command only")
    s.set_defaults(func=cmd_wheelhouse)

    sub.add_parser("vllm-kernel", help="kernel-only vLLM install (python -m lib vllm-kernel --help)", add_help=False)
    sub.add_parser("vllm2024-kernel", add_help=False,
                   help="build vLLM's 2024 paged_attention v1/v2 from its release source "
                        "(python -m lib vllm2024-kernel --help)")
    sub.add_parser("flashinfer-kernel", add_help=False,
                   help="kernel-only FlashInfer install, or its GPU check (python -m lib flashinfer-kernel --help)")
    return p


def param_alias(argv: list[str]) -> list[str]:
    """``-p NAME VALUE`` (reproduce's older form) as ``-p NAME=VALUE``: one -p syntax for every
    command, the old one kept as an alias."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        val = argv[i + 2] if i + 2 < len(argv) else None
        if (a in ("-p", "--param") and nxt is not None and "=" not in nxt and not nxt.startswith("-")
                and val is not None and (not val.startswith("-") or val[1:2].isdigit() or val[1:2] == ".")):
            out += [a, f"{nxt}={val}"]
            i += 3
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vllm-kernel":
        from lib.tools import vllm_install

        return int(vllm_install.cli(argv[1:]) or 0)
    if argv and argv[0] == "vllm2024-kernel":
        from lib.tools import vllm2024

        return int(vllm2024.cli(argv[1:]) or 0)
    if argv and argv[0] == "flashinfer-kernel":
        from lib.tools import flashinfer_install

        return int(flashinfer_install.cli(argv[1:]) or 0)
    args = _parser().parse_args(param_alias(argv))
    from lib.harness.sweep import NeedsGPU

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NeedsGPU) as e:  # usage errors: print one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rows measured so far are saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
