"""Every experiment of the study by name: what ``python -m lib sweep NAME`` runs.

Each chapter package declares its experiments; this module, above every layer, only lists them.
"""

from __future__ import annotations

from lib.chapters.kernel.experiment import CORRECTNESS, KERNEL_SPEED
from lib.chapters.kv_offload.experiment import EXPERIMENT as KV_OFFLOAD
from lib.chapters.page_table.experiment import EXPERIMENT as PAGE_TABLE
from lib.chapters.seed_repro.experiment import EXPERIMENT as SEED_TABLES
from lib.chapters.uvm.experiment import EXPERIMENT as UVM
from lib.chapters.uvm_decode.experiment import EXPERIMENT as UVM_DECODE
from lib.chapters.vmm.experiment import EXPERIMENT as VMM_KV
from lib.harness.experiments import SELFTEST, Experiment, suggest

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    SELFTEST, CORRECTNESS, KERNEL_SPEED, SEED_TABLES, PAGE_TABLE, UVM_DECODE, UVM, VMM_KV, KV_OFFLOAD)}


def get(name: str) -> Experiment:
    """The experiment called ``name``, or a ValueError that suggests close names."""
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}{suggest(name, EXPERIMENTS)}") from None
