"""The GPUs a run can be planned for, from NVIDIA's published specifications.

    spec = gpu("h100-80gb")
    spec.memory_bytes, spec.usable_bytes          # what CUDA reports; what the JAX trainer lets XLA use
    spec.target_config(cudnn=(9, 8), cuda=(12, 9)) # XLA's GpuTargetConfigProto as text, for deviceless compiling

Each entry holds what XLA's GPU compiler reads of a device (SM count and clock,
shared memory and threads per SM, L2 size, memory size and bandwidth, compute
capability). `memory_bytes` is the total CUDA reports for the card (nvidia-smi's
MiB), not the marketing figure; the JAX trainer lets XLA allocate
`USABLE_FRACTION` of it (`XLA_PYTHON_CLIENT_MEM_FRACTION`), the rest is left to the
CUDA context, cuDNN and NCCL.
"""

from __future__ import annotations

import dataclasses

MIB = 2**20
GIB = 2**30
USABLE_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str  # the device kind CUDA reports
    sms: int
    clock_ghz: float  # boost clock
    memory_mib: int  # total device memory as CUDA reports it
    bandwidth_gbs: float  # memory bandwidth, GB/s
    l2_mib: int
    compute_capability: tuple[int, int]
    smem_per_sm_kib: int  # shared memory per SM
    smem_optin_kib: int  # largest shared memory one block may opt in to
    threads_per_sm: int
    fp32_per_sm: int  # FP32 lanes per SM

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * USABLE_FRACTION)

    def target_config(self, *, cudnn: tuple[int, int], cuda: tuple[int, int]) -> str:
        """`stream_executor::GpuTargetConfigProto` in text form (what `get_topology_desc` takes)."""
        major, minor = self.compute_capability
        info = {
            "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": self.smem_per_sm_kib * 1024,
            "shared_memory_per_block_optin": self.smem_optin_kib * 1024,
            "threads_per_core_limit": self.threads_per_sm, "core_count": self.sms, "fpus_per_core": self.fp32_per_sm,
            "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
            "memory_bandwidth": int(self.bandwidth_gbs * 1e9), "l2_cache_size": self.l2_mib * MIB,
            "clock_rate_ghz": self.clock_ghz, "device_memory_size": self.memory_bytes,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
        }
        fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
        return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
                f'platform_name: "CUDA"\n'
                f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}\n"
                f"runtime_version {{ major: {cuda[0]} minor: {cuda[1]} }}\n"
                f'device_description_str: "{self.name}"\n')


# Keys are what `--gpu` takes.
GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec("NVIDIA H100 80GB HBM3", sms=132, clock_ghz=1.98, memory_mib=81559, bandwidth_gbs=3352.32,
                         l2_mib=50, compute_capability=(9, 0), smem_per_sm_kib=228, smem_optin_kib=227,
                         threads_per_sm=2048, fp32_per_sm=128),
    "h200-141gb": GpuSpec("NVIDIA H200", sms=132, clock_ghz=1.98, memory_mib=143771, bandwidth_gbs=4800.0,
                          l2_mib=50, compute_capability=(9, 0), smem_per_sm_kib=228, smem_optin_kib=227,
                          threads_per_sm=2048, fp32_per_sm=128),
    "a100-80gb": GpuSpec("NVIDIA A100-SXM4-80GB", sms=108, clock_ghz=1.41, memory_mib=81920, bandwidth_gbs=2039.0,
                         l2_mib=40, compute_capability=(8, 0), smem_per_sm_kib=164, smem_optin_kib=163,
                         threads_per_sm=2048, fp32_per_sm=64),
    "a100-40gb": GpuSpec("NVIDIA A100-SXM4-40GB", sms=108, clock_ghz=1.41, memory_mib=40960, bandwidth_gbs=1555.0,
                         l2_mib=40, compute_capability=(8, 0), smem_per_sm_kib=164, smem_optin_kib=163,
                         threads_per_sm=2048, fp32_per_sm=64),
    "l40s": GpuSpec("NVIDIA L40S", sms=142, clock_ghz=2.52, memory_mib=46068, bandwidth_gbs=864.0, l2_mib=96,
                    compute_capability=(8, 9), smem_per_sm_kib=100, smem_optin_kib=99, threads_per_sm=1536,
                    fp32_per_sm=128),
}
ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "h200": "h200-141gb", "a100": "a100-80gb"}


def key(name: str) -> str:
    """The `GPUS` key of `--gpu NAME` (case-insensitive; a few short aliases); a clear error listing the known ones."""
    found = ALIASES.get(name.lower(), name.lower())
    if found not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (aliases: {', '.join(ALIASES)})")
    return found


def gpu(name: str) -> GpuSpec:
    """The spec of `--gpu NAME` (see `key`)."""
    return GPUS[key(name)]
