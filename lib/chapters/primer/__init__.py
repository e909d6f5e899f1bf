"""The Unified Memory primer: first principles (page tables, page sizes, faults, eviction) worked
out in :mod:`.concepts`, drawn in :mod:`.figures`, tied to the committed measurements in
:mod:`.numbers`, runnable by hand on any NVIDIA GPU in :mod:`.examples` (CuPy only), and the worked
solutions of the Unified Memory exercises in :mod:`.exercises`."""
