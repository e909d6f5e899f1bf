"""The Unified Memory chapter's experiment."""

from lib.harness.experiments import Experiment, check
from lib.chapters.uvm.measure import GRID

EXPERIMENT = check(Experiment(
    name="uvm",
    description="Unified Memory in practice: GPU read bandwidth by memory kind and state "
                "(64 MiB-8 GiB), CPU reads after GPU writes, migration granularity, prefetch "
                "vs PCIe copies (lib.chapters.uvm.measure)",
    chapter="chapters/uvm.md",
    measure="lib.chapters.uvm.measure:measure_point",
    grid=GRID,
    selectors=("measurement",),  # `-p measurement=gpu_read` runs that sub-grid, nothing else
))
