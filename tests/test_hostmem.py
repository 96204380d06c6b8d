"""The CLIs' restart with huge-page malloc (qvl_core.hostmem): when it happens, and that it cuts page faults."""

import json
import os
import subprocess
import sys

from qvl_core import hostmem

_PROBE = """
import json, os, resource, sys
from qvl_core import hostmem
hostmem.use_huge_page_malloc()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # what an XLA step does with its temporaries: allocate, touch, free (plain malloc: numpy
    block = libc.malloc(64 << 20)  # asks for huge pages on its own)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults,
                  "argv": sys.argv[1:]}))
"""


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "QVL_HUGEPAGE_MALLOC")}
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, "--flag", "x"], env={**base, **env},
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return proc.pid, json.loads(out.strip().splitlines()[-1])


def test_status_reads_the_environment(monkeypatch):
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: "madvise")
    assert hostmem.status({})[0] == "available"
    assert hostmem.status({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})[0] == "on"
    assert hostmem.status({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})[0] == "on"
    assert hostmem.status({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})[0] == "off"
    assert hostmem.status({"QVL_HUGEPAGE_MALLOC": "0"}) == ("off", "QVL_HUGEPAGE_MALLOC=0")
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: "never")
    assert hostmem.status({})[0] == "off"
    monkeypatch.setattr(hostmem, "_thp_mode", lambda: "always")
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.31"))
    state, reason = hostmem.status({})
    assert state == "off" and "2.35" in reason and "2.31" in reason
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))
    assert hostmem.status({})[0] == "off"


def test_restart_keeps_the_process_and_its_arguments_and_cuts_page_faults():
    state, reason = hostmem.status({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    pid, restarted = _probe()
    _, opted_out = _probe(QVL_HUGEPAGE_MALLOC="0")
    _, kept = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert opted_out["tunables"] is None
    assert restarted["pid"] == pid and restarted["argv"] == ["--flag", "x"]
    if state == "available":  # a Linux machine with glibc >= 2.35 and THP not off, like this project's CI
        assert restarted["tunables"] == "glibc.malloc.hugetlb=1"
        assert kept["tunables"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
        # 8 x 64 MiB touched afresh: ~131,000 faults of 4 KiB pages; 2 MiB pages need 512x fewer.
        assert opted_out["faults"] > 100_000 and restarted["faults"] < opted_out["faults"] / 20, (restarted, opted_out)
    else:
        assert restarted["tunables"] is None, reason


def test_a_failed_restart_carries_on(monkeypatch, capsys):
    monkeypatch.setattr(hostmem, "status", lambda environ=None: ("available", "test"))
    monkeypatch.setattr(hostmem.sys, "orig_argv", ["python", "-m", "qvl_jax.train"], raising=False)

    def fail(*args):
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setattr(hostmem.os, "execve", fail)
    hostmem.use_huge_page_malloc()
    assert "continuing without it" in capsys.readouterr().err


def test_describe_names_the_page_size_and_the_reason():
    assert hostmem.describe("on", "GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == \
        "2 MiB pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)"
    assert hostmem.describe("available", "x") == "4 KiB pages (x)"
    assert hostmem.describe("off", "QVL_HUGEPAGE_MALLOC=0") == "4 KiB pages (QVL_HUGEPAGE_MALLOC=0)"
