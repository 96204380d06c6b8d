"""Host memory: glibc's malloc backed by transparent huge pages for the command-line tools.

XLA:CPU allocates a step's temporary buffers afresh on every execution and glibc hands
large blocks back to the kernel when they are freed, so each step touches its working
memory for the first time again: on `configs/bench_small.yaml` that is ~146,000 minor page
faults (~600 MB of 4 KiB pages) per step, about a quarter of the step's time on a CPU
(docs/performance.md). glibc >= 2.35 can ask for 2 MiB pages for its heap and its mmap'd
blocks (`glibc.malloc.hugetlb=1`), which cuts the faults 512-fold. glibc reads that tunable
only when a process starts, so a CLI calls `use_huge_page_malloc()` first thing and the
process restarts itself once with it set (same PID, arguments and environment otherwise).

`QVL_HUGEPAGE_MALLOC=0` turns this off; so does a kernel with transparent huge pages set to
`never`, a libc other than glibc >= 2.35, or a `GLIBC_TUNABLES` that already names the setting.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...] | None:
    libc, version = platform.libc_ver()
    if libc != "glibc" or not version:
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None if unknown."""
    try:
        text = open(_THP).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def status(environ=None) -> tuple[str, str]:
    """("on" | "off" | "available", a one-line reason) for a process with this environment."""
    environ = os.environ if environ is None else environ
    if sys.platform != "linux":
        return "off", f"not Linux ({sys.platform})"
    version = _glibc_version()
    if version is None or version < (2, 35):
        libc, have = platform.libc_ver()
        return "off", f"needs glibc >= 2.35 (this is {libc or 'another libc'} {have or '?'})"
    mode = _thp_mode()
    if mode == "never":
        return "off", f"transparent huge pages are off in the kernel ({_THP}: never)"
    tunables = environ.get("GLIBC_TUNABLES", "")
    if f"{TUNABLE}=1" in tunables or f"{TUNABLE}=2" in tunables:
        return "on", f"GLIBC_TUNABLES={tunables}, kernel THP mode {mode or 'unknown'}"
    if TUNABLE in tunables:
        return "off", f"GLIBC_TUNABLES={tunables} sets it otherwise"
    if environ.get("QVL_HUGEPAGE_MALLOC", "1") == "0":
        return "off", "QVL_HUGEPAGE_MALLOC=0"
    return "available", f"GLIBC_TUNABLES lacks it; kernel THP mode {mode or 'unknown'}"


def describe(state: str, reason: str) -> str:
    """One line for logs from `status()`: the page size malloc gets, and why."""
    return f"{'2 MiB' if state == 'on' else '4 KiB'} pages ({reason})"


def use_huge_page_malloc() -> None:
    """Restart the running command once with `GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1` where that
    is possible and not yet so (see the module docstring); otherwise return. Call it before any
    work: the process image is replaced."""
    argv = getattr(sys, "orig_argv", None)
    if status()[0] != "available" or not argv:
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:  # e.g. an interpreter path that is gone: carry on with 4 KiB pages
        print(f"qvl: could not restart with {TUNABLE}=1 ({e}); continuing without it", file=sys.stderr)
