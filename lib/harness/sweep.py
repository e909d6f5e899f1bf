"""Run an experiment's grid point by point, crash-safe and resumable.

Each point's rows are appended as soon as they exist, so a killed sweep loses at most the point in
flight and the same command again measures only what is missing (``force=True`` measures
everything again into a new run; the loader keeps the newest rows). A sweep that finds every
point measured measures nothing: :meth:`SweepSummary.line` says so and how to force a fresh
measurement. Each process of a multi-process sweep writes
its own part file (:mod:`lib.harness.results`), tagged ``d<dev>`` (one worker per GPU) and/or
``s<i>of<n>`` (a cluster shard); a multi-GPU sweep merges its parts when all workers are done,
cluster shards are merged afterwards (``python -m lib merge <experiment>``). Each process records
its provenance under its own run_id: the ceilings it measured, the timing method's graph floor
(``graph_floor``), the clocks under load (``clocks_under_load``, also per row in ``extra``) and,
at the end, a second GPU snapshot, the library versions again (a kernel-only install is only
found once its backend loaded), its times, whether it completed and ``provenance_issues``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lib.harness import experiments as E
from lib.harness import results as R


class NeedsGPU(RuntimeError):
    """A GPU experiment was asked to run where no GPU is visible."""


@dataclass
class SweepSummary:
    experiment: str
    csv: str
    points_total: int  # points of the grid (this shard)
    points_skipped: int  # already measured
    points_done: int = 0  # measured now (ok or error)
    rows: int = 0
    errors: int = 0
    wall_s: float = 0.0  # the whole sweep
    measure_s: float = 0.0  # summed over measure calls (all workers)
    setup_s: float = 0.0  # provenance + ceilings, summed over workers
    prepare_s: float = 0.0  # the experiment's own preparation (compiling its kernels), summed
    init_s: float = 0.0  # GPU start-up: CUDA context + compiling the harness's own kernels, summed
    workers: int = 1
    run_ids: list[str] = field(default_factory=list)
    completed: bool = True

    @property
    def overhead_frac(self) -> float:
        """Share of worker time spent neither measuring, nor preparing, nor starting the GPU:
        provenance, ceilings, appends, progress, process start-up. GPU start-up is reported apart
        (on a fresh H100 node the ceilings took 3.9 s with the harness's kernel compile inside, 0.3 s
        without)."""
        busy = self.wall_s * self.workers
        work = self.measure_s + self.prepare_s + self.init_s
        return 0.0 if busy <= 0 else max(0.0, 1.0 - work / busy)

    @property
    def replayed(self) -> bool:
        """True when nothing was measured because every point already had rows."""
        return self.points_done == 0 and self.points_skipped == self.points_total

    def line(self) -> str:
        if self.replayed:
            return (f"{self.experiment}: all {self.points_total} points already measured, nothing "
                    f"measured now: the rows in {self.csv} are replayed ({FORCE_HINT.format(e=self.experiment)})")
        return (
            f"{self.experiment}: measured {self.points_done} points ({self.rows} rows, {self.errors} errors), "
            f"skipped {self.points_skipped} done; wall {self.wall_s:.1f} s, in measure {self.measure_s:.1f} s, "
            + (f"compiling {self.prepare_s:.1f} s, " if self.prepare_s else "")
            + (f"GPU start-up {self.init_s:.1f} s, " if self.init_s >= 0.05 else "")
            + f"harness overhead {100 * self.overhead_frac:.1f}% -> {self.csv}"
            + (f"; {self.points_skipped} points already measured were not measured again "
               f"({FORCE_HINT.format(e=self.experiment)})" if self.points_skipped else "")
        )


#: How to measure points that already have rows again (appended as a new run; loaders keep it).
FORCE_HINT = ("to measure them afresh: `python -m lib sweep {e} --force`, or in a chapter "
              "mode = \"run\" with UVM_STUDY_FORCE=1 (`python -m lib reproduce <chapter> -p force=1`)")


def new_run_id(tag: str | None = None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}" + (f"-{tag}" if tag else "")


def _slug(exp: E.Experiment, devices: Sequence[int] | None) -> str:
    """GPU model slug for an experiment's files ('cpu' for CPU experiments)."""
    if not exp.gpu:
        return "cpu"
    from lib.engine.gpu import gpu_available

    if not gpu_available():
        raise NeedsGPU(f"experiment {exp.name!r} needs a CUDA GPU and CuPy; none is visible here "
                       "(chapters replay committed data on CPU machines)")
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    devs = list(devices) if devices else [cupy.cuda.runtime.getDevice()]
    bad = [d for d in devs if not 0 <= d < count]
    if bad:
        raise ValueError(f"device(s) {bad} do not exist; {count} visible (0..{count - 1})")
    names = {cupy.cuda.runtime.getDeviceProperties(d)["name"] for d in devs}
    names = {n.decode() if isinstance(n, bytes) else n for n in names}
    if len(names) > 1:
        raise ValueError(f"devices {devs} are different GPU models ({sorted(names)}); sweep them separately")
    return R.gpu_slug(names.pop())


def _check_devices(devices) -> list[int] | None:
    if devices is None:
        return None
    if isinstance(devices, str):
        try:
            devices = [int(x) for x in devices.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"devices must look like 0,1,2 (got {devices!r})") from None
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty")
    if any(not isinstance(d, int) or d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct non-negative integers, got {devices}")
    return devices


def plan(exp: E.Experiment, overrides: Mapping[str, Any] | None = None, *, shard=None, force=False,
         out_dir=None, devices=None):
    """(points of this shard, points still to do, main csv path, slug): no measuring."""
    points = E.expand(exp, overrides)
    if shard is not None:
        points = E.shard(points, *shard)
    slug = _slug(exp, devices)
    main = R.csv_path(exp.name, slug, root=out_dir)
    done = set() if force else R.done_keys(main)
    return points, [p for p in points if E.point_key(p) not in done], main, slug


def run_sweep(exp: E.Experiment, overrides: Mapping[str, Any] | None = None, *,
              shard: tuple[int, int] | str | None = None, devices: Sequence[int] | str | None = None,
              force: bool = False, out_dir: str | os.PathLike | None = None, progress: bool = True,
              workers_per_device: int = 1) -> SweepSummary:
    """Measure every point of experiment ``exp`` not yet in the results; see the module docstring.

    ``overrides``: parameter -> value(s), as for :func:`lib.harness.experiments.expand`. ``shard``:
    ``(i, n)`` or ``"i/n"``, 0-based. ``devices``: GPU indices (as CUDA numbers them here), one
    worker process each; ``None`` runs in this process on the current device.
    ``workers_per_device``: several worker processes share each GPU, for experiments that time
    nothing (``Experiment.concurrent_ok``, e.g. the correctness matrix); each takes a contiguous
    run of points. Timed experiments refuse it: concurrent kernels would distort the timings.
    """
    devices = _check_devices(devices)
    if workers_per_device < 1:
        raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
    if workers_per_device > 1:
        if not exp.concurrent_ok:
            raise ValueError(f"experiment {exp.name!r} times kernels: it runs one process per GPU "
                             "(several would share the GPU and distort each other's timings)")
        devices = devices or [0]
    t0 = time.perf_counter()
    if isinstance(shard, str):
        shard = E.parse_shard(shard)
    points, todo, main, slug = plan(exp, overrides, shard=shard, force=force, out_dir=out_dir, devices=devices)
    summary = SweepSummary(exp.name, str(main), len(points), len(points) - len(todo))
    if not todo:
        summary.wall_s = time.perf_counter() - t0
        return summary
    shard_tag = None if shard is None else "s{}of{}".format(*shard)
    params = {"experiment": exp.name, "overrides": E.normalize_overrides(exp, overrides),
              "shard": shard_tag, "devices": devices, "force": force,
              "points_in_shard": len(points), "points_to_do": len(todo)}
    if devices is None:
        path = R.csv_path(exp.name, slug, part=shard_tag, root=out_dir)
        bar = _bar(len(todo), exp.name, progress)
        try:
            res = measure_points(exp, todo, path, new_run_id(shard_tag), params, on_point=lambda *_: bar.update(1))
        finally:
            bar.close()
        _add(summary, res)
    else:
        paths = _run_workers(exp, todo, slug, devices, shard_tag, params, out_dir, progress, summary,
                             workers_per_device)
        if shard_tag is None:  # one host owns every part: merge now
            R.merge_parts(main, paths)
    summary.workers = len(devices) * workers_per_device if devices else 1
    summary.wall_s = time.perf_counter() - t0
    return summary


def _add(summary: SweepSummary, res: dict) -> None:
    summary.points_done += res["points"]
    for k in ("rows", "errors", "measure_s", "setup_s", "prepare_s", "init_s"):
        setattr(summary, k, getattr(summary, k) + res[k])
    summary.run_ids.append(res["run_id"])
    summary.completed = summary.completed and res["status"] == "complete"


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pt", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- one process

def _rows_of(result: Any) -> list[dict]:
    if isinstance(result, Mapping):
        return [dict(result)]
    if isinstance(result, (list, tuple)) and result and all(isinstance(r, Mapping) for r in result):
        return [dict(r) for r in result]
    raise TypeError(f"measure must return a dict or a non-empty list of dicts, got {type(result).__name__}")


def _complete(row: dict, base: dict, point: dict) -> dict:
    """Fill identity columns and the point's parameters (non-schema ones go into ``extra``)."""
    extra = dict(row.get("extra") or {})
    for k, v in point.items():
        if k in R.BY_NAME:
            if row.get(k) is None:
                row[k] = v
        else:
            extra.setdefault(k, v)
    for k, v in base.items():
        if not R._present(row, k):
            row[k] = v
    row["extra"] = extra
    return row


def measure_points(exp: E.Experiment, points: Sequence[dict], path: str | os.PathLike, run_id: str,
                   params: dict, *, on_point: Callable[[dict, int, bool], None] | None = None) -> dict:
    """Measure ``points`` in this process, appending to ``path``; returns counters for the summary."""
    from lib.harness import provenance

    t0 = time.perf_counter()
    init_s = _start_gpu() if exp.gpu else 0.0
    t_prov = time.perf_counter()
    prov = {**provenance.collect({**params, "csv": str(path)}), "schema_version": R.SCHEMA_VERSION,
            "status": "running"}
    provenance_s = time.perf_counter() - t_prov
    ceiling = None
    clocks = None
    if exp.gpu:
        from lib.engine import memory, timing

        # what managed memory can do on this machine, in every GPU run's provenance (the uvm
        # chapter's own runner recorded it; one runner now records it for all)
        prov["managed_memory"] = memory.device_facts()
        clocks = provenance.LoadClocks()
        timing.set_load_probe(clocks)  # clocks under load from here on, ceilings included
        t_ceil = time.perf_counter()
        prov["ceilings"] = timing.measure_ceilings()
        prov["ceilings"]["measure_s"] = time.perf_counter() - t_ceil
        if prov.get("datasheet"):  # the vendor's peaks beside what was measured, labelled so
            prov["ceilings"]["datasheet"] = prov["datasheet"]
        ceiling = prov["ceilings"]["read_gbps"]
        prov["graph_floor"] = timing.graph_floor_record()
    if (prov["git"].get("check") or {}).get("status") == "mismatch":
        print(f"[{exp.name}] warning: this tree's lib/ does not match the declared commit "
              f"{prov['git']['commit']} ({prov['git']['check']['how']}); the run records both", file=sys.stderr)
    R.write_provenance(path, run_id, prov)
    measure = exp.resolve_measure()
    prepare = exp.resolve_prepare()
    t_prep = time.perf_counter()
    if prepare is not None and points:
        prepare([dict(p) for p in points])
    prepare_s = time.perf_counter() - t_prep
    slug = R._main_of(Path(path)).stem
    setup_s = time.perf_counter() - t0 - prepare_s - init_s  # provenance + ceilings
    base = {"experiment": exp.name, "run_id": run_id, "gpu_slug": slug, "status": "ok"}
    if ceiling is not None:
        base["read_ceiling_gbps"] = ceiling
    counts = {"points": 0, "rows": 0, "errors": 0, "measure_s": 0.0}
    status = "interrupted"
    try:
        for point in points:
            key = E.point_key(point)
            t1 = time.perf_counter()
            if clocks is not None:
                clocks.mark()
            try:
                rows = _rows_of(measure(dict(point)))
                failed = None
            except Exception as e:  # recorded and retried by the next run; KeyboardInterrupt is not caught
                rows, failed = [{}], f"{type(e).__name__}: {e}"
                rows[0]["error"] = failed[:2000]
            dt = time.perf_counter() - t1
            counts["measure_s"] += dt
            ident = {**base, "point_key": key, "wall_s": dt}
            done = [_complete(row, ident, point) for row in rows]
            if clocks is not None:
                under_load = provenance.row_clocks(clocks.since_mark())
                for row in done:
                    if under_load:
                        row["extra"] = {**under_load, **row["extra"]}
            if failed:
                for row in done:
                    row["status"] = "error"
            try:
                R.append_rows(path, done)
            except ValueError as e:  # a measure function returned a bad row: record why, go on
                failed = f"bad row from measure: {e}"
                done = [_complete({"status": "error", "error": failed[:2000]}, ident, point)]
                R.append_rows(path, done)
            counts["points"] += 1
            counts["rows"] += len(done)
            counts["errors"] += bool(failed)
            if failed:
                print(f"[{exp.name}] {key}: {failed}", file=sys.stderr)
            if on_point is not None:
                on_point(point, len(done), bool(failed))
        status = "complete"
    finally:
        if clocks is not None:
            from lib.engine import timing

            timing.set_load_probe(None)
            prov["clocks_under_load"] = clocks.summary()
        prov["status"] = status
        prov["end"] = {"time_utc": provenance._utc_now(), "snapshot_after": provenance.snapshot(),
                       "libraries": provenance.library_versions(),
                       "wall_s": time.perf_counter() - t0, "setup_s": setup_s, "prepare_s": prepare_s,
                       "init_s": init_s, "provenance_s": provenance_s, **counts}
        used = {r.get("backend") for r in _rows_written(path, run_id)}
        prov["provenance_issues"] = provenance.run_issues(prov, used - {None})
        if clocks is not None and not prov["clocks_under_load"].get("n"):
            prov["provenance_issues"].append("clocks: none sampled under load (no NVML, or nothing timed)")
        R.write_provenance(path, run_id, prov)
    return {**counts, "setup_s": setup_s, "prepare_s": prepare_s, "init_s": init_s, "run_id": run_id,
            "status": status}


def _rows_written(path, run_id: str) -> list[dict]:
    """The rows run ``run_id`` appended to ``path`` (raw strings; for its closing provenance)."""
    try:
        return [r for r in R.iter_raw([Path(path)]) if r["run_id"] == run_id]
    except (OSError, ValueError):
        return []


def _start_gpu() -> float:
    """Create this process's CUDA context and the harness's kernels now; seconds it took.

    Both are one-time costs a sweep pays before measuring anything: the context on every
    process, the kernels' compilation once per machine (CuPy caches them on disk).
    """
    import cupy

    from lib.engine import timing

    t = time.perf_counter()
    cupy.cuda.runtime.free(0)  # the first runtime call creates the primary context
    st = timing._device()      # compiles (or loads) the read, fill and flush kernels
    flush = st.flush_buffer()
    # the read-ceiling kernel's check, on its fixed size: compiles CuPy's reduction once here
    timing.check_read_kernel(flush[:min(timing.CHECK_BYTES, flush.nbytes - flush.nbytes % 16)])
    cupy.cuda.Device().synchronize()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- one worker per GPU

def _worker(exp: E.Experiment, dev: int, visible: str, points: list, path: str, run_id: str, params: dict, q) -> None:
    """Body of a worker process: it sees one GPU (its environment was set at birth), measures."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") != visible:  # spawn copies the parent's environment
        q.put(("fail", dev, f"worker started with CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                            f"wanted {visible!r}"))
        return
    try:
        res = measure_points(exp, points, path, run_id, params,
                             on_point=lambda p, n, bad: q.put(("point", dev, n, bad)))
        q.put(("done", dev, res))
    except BaseException:
        q.put(("fail", dev, traceback.format_exc()))


def _assignments(todo, devices, per_device):
    """(worker id, device, points) for each worker: points dealt round-robin over devices, then
    each device's share cut into `per_device` contiguous runs (neighbouring points of a grid
    share compiled kernels, so contiguous runs compile each module about once)."""
    out = []
    for k, dev in enumerate(devices):
        share = todo[k::len(devices)]
        for w in range(per_device):
            chunk = share[w * len(share) // per_device:(w + 1) * len(share) // per_device]
            if chunk:
                out.append((f"d{dev}" if per_device == 1 else f"d{dev}w{w}", dev, chunk))
    return out


def _run_workers(exp, todo, slug, devices, shard_tag, params, out_dir, progress, summary,
                 per_device: int = 1) -> list:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible_list = parent_visible.split(",") if parent_visible else None
    procs, paths = {}, []
    plan_ = _assignments(todo, devices, per_device)
    # workers compile kernels too: share the CPU among them rather than each taking all of it
    os.environ.setdefault("UVM_STUDY_COMPILE_JOBS", str(max(1, (os.cpu_count() or 1) // len(plan_))))
    for wid, dev, chunk in plan_:
        visible = visible_list[dev] if visible_list else str(dev)
        tag = f"{shard_tag}-{wid}" if shard_tag else wid
        path = str(R.csv_path(exp.name, slug, part=tag, root=out_dir))
        paths.append(path)
        p = ctx.Process(target=_worker, args=(exp, wid, visible, chunk, path, new_run_id(tag),
                                              {**params, "device": dev, "worker": wid}, q),
                        name=f"sweep-{wid}")
        # the child must see only its GPU from its first instruction (before anything imports CUDA)
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
        try:
            p.start()
        finally:
            if parent_visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = parent_visible
        procs[wid] = p
    bar = _bar(len(todo), f"{exp.name} x{len(procs)}", progress)
    failures = []
    pending = set(procs)
    try:
        while pending:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                for wid in list(pending):
                    if not procs[wid].is_alive() and procs[wid].exitcode not in (None, 0):
                        failures.append(f"worker {wid} died (exit code {procs[wid].exitcode})")
                        pending.discard(wid)
                continue
            kind, dev = msg[0], msg[1]
            if kind == "point":
                bar.update(1)
            elif kind == "done":
                _add(summary, msg[2])
                pending.discard(dev)
            else:
                failures.append(f"worker {dev} failed:\n{msg[2]}")
                pending.discard(dev)
    except KeyboardInterrupt:
        for p in procs.values():
            p.terminate()
        raise
    finally:
        bar.close()
        for p in procs.values():
            p.join(timeout=30)
    if failures:
        summary.completed = False
        raise RuntimeError("sweep workers failed (rows measured so far are saved; rerun to resume):\n"
                           + "\n".join(failures))
    return paths
