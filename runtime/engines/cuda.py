"""What the host's CUDA offers onnxruntime: GPUs that answer (a ctypes probe of the driver, no CUDA toolkit
needed), whether the driver is new enough for the installed onnxruntime-gpu wheel, and the GPU index of a device."""

from __future__ import annotations

from runtime.errors import ConfigError


def cuda_device_count() -> int:
    """GPUs that onnxruntime's CUDA provider could use: 0 without the provider or without an answering driver."""
    try:
        import onnxruntime as ort
    except ImportError:
        return 0
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return 0
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        ok = lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0
        return count.value if ok else 0
    except OSError:
        return 0


def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider *and* a GPU answers (the provider alone loads without one)."""
    return cuda_device_count() > 0


def cuda_driver_version() -> tuple[int, int] | None:
    """The newest CUDA version the host's NVIDIA driver supports (major, minor), None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def onnxruntime_cuda_major() -> tuple[str, int] | None:
    """The installed onnxruntime-gpu's version and the CUDA major version it was built for (its wheel names the
    CUDA runtime it needs), None without onnxruntime-gpu."""
    import re
    from importlib import metadata

    try:
        dist = metadata.distribution("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return None
    for requirement in dist.requires or []:
        found = re.match(r"nvidia-cuda-runtime(?:-cu(\d+))?\s*~=\s*(\d+)", requirement)
        if found:
            return dist.version, int(found[1] or found[2])
    return None


def cuda_driver_problem() -> str | None:
    """A plain sentence when the host's driver is too old for the installed onnxruntime-gpu, else None."""
    driver, built = cuda_driver_version(), onnxruntime_cuda_major()
    if driver is None or built is None or driver[0] >= built[1]:
        return None
    return (f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} only, but onnxruntime-gpu {built[0]} needs CUDA "
            f"{built[1]}: update the host's NVIDIA driver, or install an onnxruntime-gpu built for CUDA "
            f"{driver[0]} (for CUDA 12: onnxruntime-gpu<1.27, what the CUDA image ships)")


def cuda_index(device: str) -> int | None:
    """The GPU index of 'cuda' / 'cuda:N', None for other devices; bad forms raise."""
    if device == "cuda":
        return 0
    if not device.startswith("cuda:"):
        return None
    try:
        index = int(device[5:])
    except ValueError:
        index = -1
    if index < 0:
        raise ConfigError(f"device '{device}' is not known; use auto, cpu, cuda or cuda:N (N = GPU index from 0)")
    return index
