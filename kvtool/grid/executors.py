"""Where cells run: in this process, in local worker processes, or in Ray actors.

Every executor has ``size`` slots, each a :class:`~kvtool.grid.cells.Worker` that keeps its model between
cells. The scheduler (:func:`kvtool.grid.run.run_grid`) gives a free slot one cell with :meth:`submit` and
collects ``(slot, row)`` from :meth:`next_result`. A slot whose process or actor dies yields a ``failed`` row
for its cell and is started again, so one crash (e.g. the kernel's OOM killer) costs one cell.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

from kvtool.errors import InputError
from kvtool.grid.cells import Cell, Worker, failed_row


class InlineExecutor:
    """One slot, in this process (``--workers 1``): no start-up cost, and a debugger sees the cells.
    ``threads``: torch threads (default: torch's own choice)."""

    size = 1

    def __init__(self, threads: int | None = None) -> None:
        self.worker = Worker("local:0")
        self.threads = threads
        self._cell: Cell | None = None

    def start(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def submit(self, slot: int, cell: Cell) -> None:
        self._cell = cell

    def next_result(self) -> tuple[int, dict[str, Any]]:
        cell, self._cell = self._cell, None
        if cell is None:
            raise RuntimeError("next_result() without a submitted cell")
        return 0, self.worker.run(cell)

    def close(self) -> None:
        pass


def _process_main(conn: Any, name: str, threads: int | None) -> None:
    """A local worker process: take cells from ``conn`` until None, send back rows."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver decides
    if threads:
        import torch

        torch.set_num_threads(threads)
    worker = Worker(name)
    while True:
        cell = conn.recv()
        if cell is None:
            return
        conn.send(worker.run(cell))


#: Thread-pool sizes read by the BLAS and OpenMP runtimes when they load (numpy's and torch's), as Ray sets them.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """The environment a spawned worker starts with: ``threads`` threads for every BLAS/OpenMP pool. The child
    imports numpy before its first line runs, so torch.set_num_threads there alone would leave numpy's pool at
    one thread per core, and N workers would oversubscribe the CPUs."""
    old = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(threads) for k in THREAD_ENV})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalExecutor:
    """``size`` worker processes (multiprocessing, spawn: no fork of a process that holds torch threads).

    ``threads``: torch threads per worker (default: the CPUs divided among the workers, at least 1), so N
    workers do not each start one thread per core.
    """

    def __init__(self, size: int, threads: int | None = None) -> None:
        if size < 1:
            raise InputError(f"--workers must be >= 1, got {size}")
        self.size = size
        self.threads = threads or max(1, (os.cpu_count() or 1) // size)
        self._procs: list[Any] = [None] * size
        self._conns: list[Any] = [None] * size
        self._cells: list[Cell | None] = [None] * size

    def start(self) -> None:
        for slot in range(self.size):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_process_main, args=(child, f"local:{slot}", self.threads), daemon=True,
                           name=f"kvtool-grid-{slot}")
        with _thread_env(self.threads):
            proc.start()
        child.close()
        self._procs[slot], self._conns[slot] = proc, parent

    def submit(self, slot: int, cell: Cell) -> None:
        self._cells[slot] = cell
        self._conns[slot].send(cell)

    def next_result(self) -> tuple[int, dict[str, Any]]:
        from multiprocessing.connection import wait

        busy = [s for s in range(self.size) if self._cells[s] is not None]
        if not busy:
            raise RuntimeError("next_result() without a submitted cell")
        waitables = {self._conns[s]: s for s in busy} | {self._procs[s].sentinel: s for s in busy}
        ready = wait(list(waitables))
        slot = waitables[ready[0]]
        cell = self._cells[slot]
        self._cells[slot] = None
        try:
            return slot, self._conns[slot].recv()
        except (EOFError, OSError):  # the process died in the cell
            self._procs[slot].join(timeout=5)
            code = self._procs[slot].exitcode
            self._spawn(slot)
            return slot, failed_row(cell, f"worker process died (exit code {code}; killed for memory?)",
                                    f"local:{slot}")

    def close(self) -> None:
        for slot, proc in enumerate(self._procs):
            if proc is None:
                continue
            if self._cells[slot] is None and proc.is_alive():
                try:
                    self._conns[slot].send(None)
                except (BrokenPipeError, OSError):
                    pass
                proc.join(timeout=10)
            if proc.is_alive():  # interrupted mid-cell: its row is lost anyway
                proc.terminate()
                proc.join(timeout=10)
            self._conns[slot].close()
        self._procs = [None] * self.size


def parse_memory(text: str) -> int:
    """Bytes from ``--ray-memory`` text such as ``4GiB`` or ``512MB`` (a bare number is bytes)."""
    from kvtool.models import SIZE_UNITS

    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in ("", *SIZE_UNITS) or float(m.group(1)) <= 0:
        raise InputError(f"--ray-memory must be a size above zero with a unit B, KB, MB, GB, KiB, MiB or GiB "
                         f"(e.g. 4GiB), got {text!r}")
    return int(float(m.group(1)) * SIZE_UNITS.get(m.group(2), 1))


class _RayWorker:
    """The Ray actor: a :class:`Worker` kept alive between calls, so its model stays loaded."""

    def __init__(self, name: str) -> None:
        self.worker = Worker(name)

    def run(self, cell: Cell) -> dict[str, Any]:
        return self.worker.run(cell)


class RayExecutor:
    """``size`` Ray actors, each declaring ``num_cpus``, ``num_gpus`` and ``memory`` (bytes) to the scheduler.

    ``address``: ``"local"`` starts a private Ray instance on this machine (``num_cpus`` × ``size`` CPUs),
    ``"auto"`` joins the cluster this machine belongs to (``RAY_ADDRESS`` or a running ``ray start``), any
    other value is passed to ``ray.init(address=...)`` (``ray://head:10001``, ``head:6379``). If Ray is
    already initialised in this process, it is used as it is and left running.
    """

    def __init__(self, size: int, address: str | None = "local", *, num_cpus: float = 1, num_gpus: float = 0,
                 memory: int | None = None) -> None:
        if size < 1:
            raise InputError(f"--workers must be >= 1, got {size}")
        self.size, self.address = size, address
        self.resources = {"num_cpus": num_cpus, "num_gpus": num_gpus, **({"memory": memory} if memory else {})}
        self._actors: list[Any] = [None] * size
        self._refs: dict[Any, tuple[int, Cell]] = {}
        self._started_ray = False

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install 'kvtool[ray]'") from None
        return ray

    def start(self) -> None:
        ray = self._ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address == "local":
                kwargs["num_cpus"] = int(max(1, self.resources["num_cpus"]) * self.size)
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise InputError(f"--ray {self.address}: cannot start or reach Ray "
                                 f"({' '.join(str(exc).split())[:200]})") from None
            self._started_ray = True
        self._cls = ray.remote(_RayWorker).options(**self.resources)
        for slot in range(self.size):
            self._actors[slot] = self._cls.remote(f"ray:{slot}")

    def submit(self, slot: int, cell: Cell) -> None:
        self._refs[self._actors[slot].run.remote(cell)] = (slot, cell)

    def next_result(self) -> tuple[int, dict[str, Any]]:
        ray = self._ray()
        if not self._refs:
            raise RuntimeError("next_result() without a submitted cell")
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        slot, cell = self._refs.pop(ready[0])
        try:
            return slot, ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # the actor died (node lost, killed for memory)
            self._actors[slot] = self._cls.remote(f"ray:{slot}")
            reason = " ".join(str(exc).split())[:200]
            return slot, failed_row(cell, f"Ray actor died ({type(exc).__name__}: {reason})", f"ray:{slot}")

    def close(self) -> None:
        ray = self._ray()
        for actor in self._actors:
            if actor is not None:
                ray.kill(actor)
        self._actors = [None] * self.size
        self._refs.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
