"""One rank of benchmarks/scale.py: run ``dist_triplet.train.main(argv)`` while a thread
samples this process's memory, then write ``OUT/mem_rank{r}.json``.

    horovodrun -np 4 -H localhost:4 --gloo python benchmarks/_scale_worker.py OUT train-args...

Memory, from /proc/self/smaps_rollup every 0.2 s (Linux): peak ``Rss`` (what ps and top
show; counts a shared file page in every process that maps it), peak ``Pss`` (each shared
page divided among the processes that map it: the fair share, so the ranks' Pss add up to
what the host holds), peak ``Anonymous`` (private memory: heap, NumPy arrays, MXNet's
buffers); and ``VmHWM`` (the kernel's peak Rss) at exit.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time


def _rollup() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def proc_bytes(path: str, key: str) -> int:
    """Bytes of the ``key:  N kB`` line of a /proc file (``/proc/meminfo``,
    ``/proc/self/status``); 0 when the line is missing."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period = period
        self.peak = {"Rss": 0, "Pss": 0, "Anonymous": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.period)

    def sample(self) -> None:
        now = _rollup()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now.get(key, 0))


def main(argv) -> int:
    out_dir, train_argv = argv[0], argv[1:]
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    from dist_triplet.train import main as train_main
    code = train_main(train_argv)
    sampler.done.set()
    sampler.join()
    sampler.sample()
    rank = int(os.environ.get("HOROVOD_RANK", 0))
    record = {"rank": rank, "local_rank": int(os.environ.get("HOROVOD_LOCAL_RANK", 0)),
              "exit": code, "seconds": time.perf_counter() - t0,
              "vm_hwm": proc_bytes("/proc/self/status", "VmHWM"),
              **{f"peak_{k.lower()}": v for k, v in sampler.peak.items()}}
    with open(os.path.join(out_dir, f"mem_rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
