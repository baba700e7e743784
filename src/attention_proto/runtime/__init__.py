"""Runtime pieces shared by every op and study: device facts, timing, kernel cache, validation."""
from .cache import KERNEL_CACHE, KernelCache
from .device import device_facts, gpu_slug, interpreter_mode, kernel_device

__all__ = ["KERNEL_CACHE", "KernelCache", "device_facts", "gpu_slug", "interpreter_mode", "kernel_device"]
