"""Our paged-attention decode kernels: instantiation rules, compile cache and launcher.

The CUDA source is `paged_attention.cu` beside this file. Each (dtype, block size, head size,
head tile) is one CuPy `RawModule` holding the three addressing modes and the v2 reduce kernel,
compiled once per process (and cached on disk by CuPy). Everything that decides *which* kernel
and *how* it is launched is plain Python, importable and testable without a GPU.
"""

from lib.engine.kernels.launch import OwnDecode, get_module, precompile  # noqa: F401
from lib.engine.kernels.plan import *  # noqa: F401,F403
