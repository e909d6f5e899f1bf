"""A reproducible study of CUDA Unified Memory and PagedAttention's page table.

Importable on any machine: GPU libraries (CuPy, torch, nvidia-ml-py) are imported
lazily inside the functions that need them.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The repository root (the book's root): `lib/` lives directly inside it.
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
