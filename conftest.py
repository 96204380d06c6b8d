"""Test-session settings shared by tests/ and parity_tests/ (and every process they start)."""

import os
import shutil
import tempfile


def pytest_configure(config):
    # JAX on the CPU only, also where the CUDA plugin is installed (the planner's tests compile for GPUs through
    # it): without a driver its start-up check would fail noisily in every process, and the planner needs the
    # check skipped before JAX first looks for backends.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    # The trainers' CLIs restart themselves once to turn on glibc's huge-page malloc (qvl_core.hostmem), paying
    # their imports twice; started with it set, the subprocesses the tests run do not (tests/test_hostmem.py
    # checks the restart itself, in an environment without it).
    os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    # XLA:CPU's LLVM back end at -O0: most of the suite's time is compiling tiny programs, whose run time does
    # not matter. The programs XLA builds (fusion, layout, sharding, memory plans) are the same; only the
    # machine code is less optimised, so float results may differ in the last bit from an optimised build (the
    # tests compare runs within one setting, or against torch within the parity contract).
    # Set QVL_TEST_XLA_OPT=1 to test with XLA's default.
    if os.environ.get("QVL_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
            "XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    # One JAX compilation cache per test session, shared by the xdist workers and the trainers they start as
    # subprocesses (which inherit the environment): the tiny models' steps compile once instead of once per
    # process. Set before any test imports jax; removed at the end, so nothing carries over between sessions.
    if os.environ.get("PYTEST_XDIST_WORKER") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config.qvl_jax_cache = tempfile.mkdtemp(prefix="qvl-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config.qvl_jax_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    cache = getattr(config, "qvl_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
