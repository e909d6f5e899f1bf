"""Our paged-attention decode kernels (`paged_attention.cu`): instantiation rules, compile cache,
launcher. Each (dtype, block size, head size, head tile) is one CuPy `RawModule` holding the three
addressing modes and the v2 reduce kernel; which kernel and how it launches is plain Python
(:mod:`.plan`), testable without a GPU.
"""

from lib.engine.kernels.launch import OwnDecode, get_module, precompile  # noqa: F401
from lib.engine.kernels.plan import *  # noqa: F401,F403
