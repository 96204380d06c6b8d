"""qvl_core: what both trainers share (config, data, FLOP accounting); imports neither jax nor torch."""

import ctypes.util
import os

# JAX's CUDA plugin (installed for the planner, `.[cuda]`) checks the driver when JAX starts and, on a machine
# without one, prints a long traceback before falling back to the CPU. Without a driver it cannot run anyway, so
# the check is skipped there and JAX starts on the CPU quietly; machines with a driver keep the check. Every qvl
# entry point imports this package before JAX looks for backends.
if not os.path.exists("/proc/driver/nvidia") and ctypes.util.find_library("cuda") is None:
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
