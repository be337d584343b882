"""Peak memory of a selection: a thread samples the process's resident set (/proc/self/statm) every 2 ms and the
peak above its level at the start is recorded (tracemalloc does not see torch's allocator).  It is a lower bound:
spikes shorter than the interval are missed, and memory the process still holds from earlier work (freed, but kept
by the allocator) is reused without showing, so small selections often read 0.  On CUDA the peak allocated device
memory (exact) is recorded too."""
from __future__ import annotations

import os
import threading

import torch


class PeakMemory:
    """Context manager: peak resident memory (MiB) above the level at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.002, device: torch.device | None = None):
        self.interval, self.device, self.peak_mb, self.cuda_peak_mb = interval, device, None, None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource  # fallback: the high-water mark, so only growth above the previous peak shows

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _sample(self):
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_mb = (max(self.peak, self.rss()) - self.start) / 2 ** 20
        if self.device is not None and self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return False
