"""Readings of the machine for StepMetrics: GPU memory and utilisation, the worker's RAM."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import psutil
import torch

log = logging.getLogger(__name__)


@dataclass
class SystemReading:
    gpu_mem_allocated: Optional[float] = None
    gpu_mem_reserved: Optional[float] = None
    gpu_mem_total: Optional[float] = None
    gpu_util: Optional[float] = None
    ram: Optional[float] = None


class SystemMonitor:
    """Reads torch's CUDA allocator, NVML utilisation (when nvidia-ml-py works) and process RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self._process = psutil.Process(os.getpid())
        self._nvml_handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as exc:  # NVML missing or refused: utilisation is then just absent
                log.debug("NVML unavailable: %s", exc)

    def read(self) -> SystemReading:
        reading = SystemReading(ram=float(self._process.memory_info().rss))
        if self.device.type == "cuda":
            reading.gpu_mem_allocated = float(torch.cuda.max_memory_allocated(self.device))
            reading.gpu_mem_reserved = float(torch.cuda.memory_reserved(self.device))
            reading.gpu_mem_total = float(torch.cuda.get_device_properties(self.device).total_memory)
            torch.cuda.reset_peak_memory_stats(self.device)
            if self._nvml_handle is not None:
                try:
                    import pynvml

                    reading.gpu_util = float(pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu)
                except Exception:
                    pass
        return reading
