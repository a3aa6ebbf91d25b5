"""What every benchmark driver shares: data, the product as training builds it, timing,
the load other processes put on the machine, subprocess workers and the results table.

Nothing here runs at import time; MXNet is imported only inside the functions that need
it, so a driver can set OMP_NUM_THREADS first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_MARK = "BENCH_JSON "          # prefix of the one result line a worker prints
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
TRAIN_ROWS, TEST_ROWS, FEATURES, CLASSES = 60000, 10000, 784, 10


# ----------------------------------------------------------------------------- data

def synthetic_split(rows: int, seed: int = 0):
    """(rows, 784) float32 in [0, 1) and (rows,) int64 labels of 10 balanced classes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(rows) % CLASSES).astype(np.int64)
    return rng.random((rows, FEATURES), dtype=np.float32), labels


def load_data(synthetic: bool, train_size: int = 0, train: bool = True,
              root: str = FASHION_MNIST_ROOT):
    """The benchmarks' data: (images (N, F) float32, labels (N,) int64, source str).

    Fashion-MNIST from ``root`` unless ``synthetic`` or the directory is missing, in which
    case synthetic data of the same shape; ``train_size`` > 0 keeps a seeded sample of
    that many rows (the test split keeps train_size // 6, as 10,000 / 60,000).
    """
    full = TRAIN_ROWS if train else TEST_ROWS
    limit = train_size if train else (max(train_size // 6, 2 * CLASSES) if train_size else 0)
    if not synthetic and os.path.isdir(root):
        from dist_triplet.data import load_dataset, subset
        split = subset(load_dataset("fashion_mnist", root, train=train), limit, seed=0)
        return split.images, split.labels, f"Fashion-MNIST ({root})"
    rows = limit or full
    images, labels = synthetic_split(rows, seed=0 if train else 1)
    why = "--synthetic" if synthetic else f"Fashion-MNIST not found at {root}"
    return images, labels, f"synthetic {rows}x{FEATURES} float32, {CLASSES} classes ({why})"


# ----------------------------------------------------------------------------- the product

def make_cfg(overrides: Sequence[str] = (), config: Optional[str] = None):
    """A training Config: ``config`` (a YAML path, None = defaults: the seed's MLP, SGD lr
    0.05, batch 256) with ``overrides``, CPU, no progress bar."""
    from dist_triplet.config import load_config
    return load_config(config, ["distributed.device=cpu", "train.progress=false",
                                *overrides])


@dataclass
class Product:
    """What ``loop.train`` builds before its epoch loop, built by the same functions."""
    cfg: object
    backend: object
    net: object
    stepper: object       # engine.DataParallelStep
    sampler: object       # triplets.EpochSampler
    lr_at: Callable[[int], float]

    @property
    def per_step(self) -> int:
        """Triplets (offline) or images (P x K) one step of this process takes."""
        return self.sampler.per_step


def build_product(cfg, images: np.ndarray, labels: np.ndarray, image_shape=None) -> Product:
    """The backend, network, step, sampler and schedule of ``cfg``, as ``loop.train``
    makes them (``plan.build_sampler``, ``backbone.build_network``, ``engine.build_step``,
    ``schedule.from_config``); ``image_shape`` (H, W, C) of the rows, for a convolutional
    ``model.backbone``."""
    from dist_triplet import schedule
    from dist_triplet.backbone import build_network, initialize_network
    from dist_triplet.dist import make_backend
    from dist_triplet.engine import build_step
    from dist_triplet.plan import build_sampler

    backend = make_backend(cfg.distributed.backend, cfg.distributed.device,
                           cfg.distributed.devices)
    sampler = build_sampler(cfg, backend, labels)
    net = build_network(cfg.model, images.shape[1], image_shape)
    initialize_network(net, cfg.model, backend.contexts, cfg.train.seed, images.shape[1])
    backend.broadcast_parameters(net.collect_params())
    stepper = build_step(cfg, backend, net, images, labels, image_shape)
    lr_at = schedule.from_config(cfg.optim, cfg.train.epochs, sampler.steps,
                                 sampler.per_step * backend.num_processes)
    return Product(cfg, backend, net, stepper, sampler, lr_at)


class EpochRunner:
    """Runs the product's steps through ``engine.run_epoch``, the training loop itself, in
    windows of ``n`` steps: a window is the next ``n`` batches of the current epoch handed
    to ``run_epoch`` (a new epoch from the sampler when one is used up). ``run_epoch``
    ends with its once-per-epoch host wait, so each window ends synchronised."""

    def __init__(self, product: Product):
        self.p = product
        self.epoch, self.batches, self.pos = -1, None, 0

    def run(self, n: int) -> None:
        from dist_triplet.engine import run_epoch
        p = self.p
        while n > 0:
            if self.batches is None or self.pos >= len(self.batches):
                self.epoch += 1
                self.batches, self.pos = p.sampler.epoch(self.epoch), 0
            take = min(n, len(self.batches) - self.pos)
            window = self.batches[self.pos:self.pos + take]
            # run_epoch numbers steps from 0 within what it is given: offset the schedule.
            offset = self.epoch * p.sampler.steps + self.pos
            run_epoch(p.stepper, window, 0, lr_at=lambda s, o=offset: p.lr_at(o + s),
                      sync_every=p.cfg.train.sync_every)
            self.pos += take
            n -= take


# ----------------------------------------------------------------------------- timing

def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def median_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn()`` (time.perf_counter)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    t = os.times()
    return t.user + t.system


def time_windows(runs: Dict[str, Callable[[int], None]], per_step: int, warmup: int,
                 windows: int, window_steps: int) -> Dict[str, dict]:
    """Throughput of each ``runs[name](n)`` (n steps of ``per_step`` items, synchronised
    at its end): warm-up, then ``windows`` rounds in which every run gets one window of
    ``window_steps`` steps. Interleaving lets a busy machine slow the runs alike.

    Returns {name: {"median": items/s, "windows": [items/s, ...], "step_ms": ms,
    "cores": CPU s per wall s over the windows, "cpu_us_per_item": CPU microseconds per
    item (robust to other processes' load: it counts only this process's own work)}}.
    """
    for run in runs.values():
        run(warmup)
    rates: Dict[str, List[float]] = {name: [] for name in runs}
    cpu = {name: 0.0 for name in runs}
    wall = {name: 0.0 for name in runs}
    for _ in range(windows):
        for name, run in runs.items():
            c0, t0 = cpu_s(), time.perf_counter()
            run(window_steps)
            dt = time.perf_counter() - t0
            cpu[name] += cpu_s() - c0
            wall[name] += dt
            rates[name].append(window_steps * per_step / dt)
    items = windows * window_steps * per_step
    return {name: {"median": median(r), "windows": r, "step_ms": 1e3 * per_step / median(r),
                   "cores": cpu[name] / wall[name], "cpu_us_per_item": 1e6 * cpu[name] / items}
            for name, r in rates.items()}


class ForeignLoad:
    """CPU that other processes used while a measurement ran, in cores: the machine's busy
    time (/proc/stat) minus this process's and its finished children's (os.times). The
    machines here are shared; a section run beside someone else's job says so."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as fh:
                f = [int(x) for x in fh.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
        return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else float("nan")


def machine_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(),
            "cpu": model, "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg())}


# ----------------------------------------------------------------------------- workers

def emit(doc: dict) -> None:
    """A worker's one result line (every rank prints one under horovodrun)."""
    print(JSON_MARK + json.dumps(doc), flush=True)


def child_env(threads: Optional[int] = None, base: Optional[dict] = None) -> dict:
    """The environment for a worker: the repository root first on PYTHONPATH (so workers
    use this tree's dist_triplet) and, if ``threads``, every thread pool set to it."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    if threads:
        for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    return env


def run_worker(cmd: List[str], env: dict, timeout: float) -> List[dict]:
    """Run a command; return the JSON objects it printed (one per rank). Raises
    RuntimeError with the tail of its output when it fails or prints none."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    found = [json.loads(line[line.find(JSON_MARK) + len(JSON_MARK):])
             for line in proc.stdout.splitlines() if JSON_MARK in line]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return found


def run_at_once(cmds: List[List[str]], env: dict, timeout: float) -> List[dict]:
    """Start every command at once, wait for all; the first JSON line of each."""
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    found = []
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=timeout)
        docs = [json.loads(line[line.find(JSON_MARK) + len(JSON_MARK):])
                for line in out.splitlines() if JSON_MARK in line]
        if proc.returncode != 0 or not docs:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                               f"{out[-2000:]}\n{err[-3000:]}")
        found.append(docs[0])
    return found


def module_cmd(module: str, *args: str) -> List[str]:
    """``python -m benchmarks.<module> args...`` with this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


# ----------------------------------------------------------------------------- report

@dataclass
class Row:
    """One line of the results table. ``target`` and ``status`` are empty for rows that
    only inform; ``status`` is 'met' or 'missed' for target rows."""
    section: str
    measurement: str
    value: str
    target: str = ""
    status: str = ""


def target_row(section: str, measurement: str, value: float, target: float, fmt: str,
               higher: bool = True, detail: str = "") -> Row:
    """A target row: ``fmt`` formats both value and target (e.g. '{:.0%}')."""
    ok = value >= target if higher else value <= target
    return Row(section, measurement, fmt.format(value) + (f" ({detail})" if detail else ""),
               (">= " if higher else "<= ") + fmt.format(target), "met" if ok else "missed")


def table(rows: Sequence[Row]) -> str:
    lines = ["| section | measurement | value | target | status |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.section} | {r.measurement} | {r.value} | {r.target} | {r.status} |"
              for r in rows]
    return "\n".join(lines)


def driver_parser(name: str, doc: str, quick_help: Optional[str] = None
                  ) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<name>``: its description is the first line of
    the driver's ``doc``; it has the options every driver takes, ``--quick`` and ``--out``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}",
                                description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", help="write the JSON here")
    return p


def run_driver(name: str, args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict],
               rows: Callable[[dict], Sequence[Row]]) -> int:
    """A driver's main: ``measure(args)``, with the cores other processes used meanwhile
    (``foreign_cores``), printed as a table of ``rows(doc)`` and, with ``--out``, written as
    ``{name: doc}`` JSON. Returns the exit status, 0."""
    load = ForeignLoad()
    doc = measure(args)
    doc["foreign_cores"] = load.cores()
    print(table(rows(doc)))
    if args.out:
        write_json(args.out, {name: doc})
    return 0


def write_json(path: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)
