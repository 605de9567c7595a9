"""Every fact about the machine this process runs on: the cores it may use, the NVIDIA devices the
container was given, the driver, and the accelerator side a TensorRT plan is tied to. Each is read
here and nowhere else, so a question about the machine has one answer."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2
    `cpu.max`, e.g. "400000 100000" for 4 cores; os.cpu_count() would count the host's)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def nvidia_devices(dev: Path = Path("/dev")) -> list[str]:
    """The NVIDIA GPU device files of this machine (`/dev/nvidia0`, ...): what the container runtime
    passes in for each GPU, whatever the CUDA libraries make of them."""
    return sorted(path.name for path in dev.glob("nvidia[0-9]*"))


def nvidia_driver(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel driver's version line, where the driver is loaded."""
    try:
        return proc.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def cuda_unusable_reason(
    devices: list[str], cuda_available: bool, torch_version: str, torch_cuda: str | None, driver: str | None
) -> str | None:
    """Why this machine's GPU cannot serve, or None where it can or where there is no GPU at all."""
    if not devices or cuda_available:
        return None
    build = f"PyTorch {torch_version} (built for CUDA {torch_cuda})" if torch_cuda else f"PyTorch {torch_version} (CPU)"
    return (
        f"this machine has an NVIDIA GPU ({', '.join('/dev/' + d for d in devices)}; driver: {driver or 'unknown'}) "
        f"but {build} cannot use it: the driver is older than that CUDA, or the GPU was not passed to the "
        "container. Install a PyTorch built for a CUDA the driver supports (config.yaml's requirements), or "
        "set engine to onnxruntime to serve on the CPU on purpose"
    )


def cuda_available() -> bool:
    """True when PyTorch can use a CUDA GPU; raises when a GPU is present but unusable (serving it from
    the CPU would be a GPU deployment answering at CPU speed without a word)."""
    try:
        import torch
    except ImportError:
        return False
    available = torch.cuda.is_available()
    reason = cuda_unusable_reason(nvidia_devices(), available, torch.__version__, torch.version.cuda, nvidia_driver())
    if reason:
        raise RuntimeError(reason)
    return available


@dataclasses.dataclass(frozen=True)
class Platform:
    """The accelerator side of a machine: what a TensorRT plan is tied to."""

    gpu_name: str | None
    compute_capability: str | None
    tensorrt_version: str | None

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None


def current_platform() -> Platform:
    """This machine's first CUDA GPU (via torch) and installed TensorRT, each None where absent."""
    import torch

    gpu_name = capability = None
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(0))
    tensorrt_version = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt

        tensorrt_version = tensorrt.__version__
    return Platform(gpu_name, capability, tensorrt_version)
