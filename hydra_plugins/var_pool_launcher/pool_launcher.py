"""Hydra launcher ``pool``: a multirun's jobs in parallel on one machine, each pinned to its own GPU.

    python run.py -m sweep=scaling_gpu_small launcher=pool                   # one grid point per GPU
    python run.py -m sweep=scaling_gpu_small launcher=pool hydra.launcher.jobs_per_device=2

The machine's GPUs (``devices``; default: every visible one) each take ``jobs_per_device`` jobs at a time.
Every job runs in a fresh spawned process with ``CUDA_VISIBLE_DEVICES`` set to its GPU, so it sees one
device as ``cuda:0`` and leaves nothing behind for the next job (memory, compile caches, NCCL state).
Without GPUs, ``workers`` processes share the CPU cores (torch threads split evenly between them).

Jobs go in order of the sweep, each to the first free slot. A job whose process dies (killed, out of
memory) is returned failed; the others go on. Each job directory gets ``launcher.json``: slot, device,
pid and start time while the job runs, then end time, exit code and status, so a reader can see which GPU
runs or made which point and how the jobs overlapped. Hydra's basic launcher runs the same jobs one after another in the launching process.
"""

import importlib
import logging
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


# A plain node, not a dataclass: configs cross into the job processes by pickle, and a class of this module
# would not unpickle there by name (Hydra loads plugin modules outside sys.modules).
ConfigStore.instance().store(group="hydra/launcher", name="pool", provider="var", node={
    "_target_": "hydra_plugins.var_pool_launcher.pool_launcher.PoolLauncher",
    "devices": None,         # GPU ids to use, e.g. [0, 1]; null: every visible GPU ([] without GPUs)
    "jobs_per_device": 1,    # jobs sharing one GPU at a time (small models leave a GPU idle)
    "workers": None,         # parallel jobs on a machine without GPUs; null: 2
    "poll_s": 0.2,
})


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (CUDA_VISIBLE_DEVICES entries, UUIDs too), without
    initialising CUDA in the launching process."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and not d.strip().startswith("-")]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: a CPU machine
        return []


def slots_for(devices: Sequence[int | str], jobs_per_device: int, workers: int | None) -> list[str | None]:
    """One entry per parallel job: the GPU it is pinned to (None: CPU only)."""
    if jobs_per_device < 1:
        raise ValueError(f"hydra.launcher.jobs_per_device={jobs_per_device}: must be at least 1")
    if devices:
        return [str(d) for d in devices for _ in range(jobs_per_device)]
    n = 2 if workers is None else int(workers)
    if n < 1:
        raise ValueError(f"hydra.launcher.workers={workers}: must be at least 1")
    return [None] * n


def _task_reference(fn: TaskFunction) -> tuple[str, str]:
    # The task function is the undecorated function under @hydra.main; a spawned process finds it by name
    # (the decorated one keeps it as __wrapped__), since pickle refuses a function its module calls otherwise.
    return fn.__module__, fn.__qualname__


def _resolve_task(module: str, qualname: str) -> TaskFunction:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__wrapped__", obj)


def _run_in_child(sweep_config: DictConfig, task: tuple[str, str], singleton_state: dict, device: str | None,
                  threads: int | None, conn) -> None:
    """Entry point of a job's process: pin the device, restore Hydra's state, run the job, send the result."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if threads is not None:  # CPU jobs side by side: split the cores instead of oversubscribing them
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    task_function = _resolve_task(*task)  # importing its module registers the project's resolvers
    from omegaconf.basecontainer import BaseContainer

    Singleton.set_state({"instances": singleton_state, "omegaconf_resolvers": BaseContainer._resolvers})
    setup_globals()
    from hydra._internal.callbacks import Callbacks

    ret = run_job(hydra_context=HydraContext(config_loader=None, callbacks=Callbacks(sweep_config)),
                  task_function=task_function, config=sweep_config, job_dir_key="hydra.sweep.dir",
                  job_subdir_key="hydra.sweep.subdir")
    try:
        pickle.dumps(ret.return_value if ret.status == JobStatus.COMPLETED else ret._return_value)
    except Exception as e:  # a result that does not pickle: keep the status, say why
        ret.return_value = repr(ret.return_value) if ret.status == JobStatus.COMPLETED else \
            RuntimeError(f"{ret._return_value!r} (the job's error did not pickle: {e})")
    # Hydra's own plugin config classes in hydra_cfg do not pickle by name either (see above); the sweep
    # needs the status and the return value, and the job directory holds .hydra/hydra.yaml.
    ret.hydra_cfg = None
    conn.send(ret)
    conn.close()


@dataclass
class _Running:
    idx: int
    slot: int
    device: str | None
    overrides: Sequence[str]
    process: Any
    conn: Any
    job_dir: Path
    started: float


class PoolLauncher(Launcher):
    def __init__(self, devices=None, jobs_per_device: int = 1, workers=None, poll_s: float = 0.2) -> None:
        self.devices = None if devices is None else [str(d) for d in devices]
        self.jobs_per_device, self.workers, self.poll_s = int(jobs_per_device), workers, float(poll_s)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _sweep_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"pool_{idx}"
            cfg.hydra.job.num = idx
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.task_function is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        devices = visible_gpus() if self.devices is None else self.devices
        slots = slots_for(devices, self.jobs_per_device, self.workers)
        threads = None if devices else max(1, (os.cpu_count() or 1) // len(slots))
        log.info(f"pool launcher: {len(job_overrides)} jobs on {len(slots)} slots "
                 f"({'GPUs ' + ','.join(map(str, devices)) if devices else 'CPU'}), sweep dir {sweep_dir}")
        ctx = mp.get_context("spawn")
        # Resolvers are closures that do not pickle; each child registers its own (see _run_in_child).
        task, state = _task_reference(self.task_function), Singleton.get_state()["instances"]
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        free, running, results = list(range(len(slots))), [], {}
        try:
            while pending or running:
                while pending and free:
                    idx, overrides = pending.pop(0)
                    slot = free.pop(0)
                    cfg = self._sweep_config(overrides, idx)
                    HydraConfig.instance().set_config(cfg)  # the subdir interpolates hydra: values
                    job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                    log.info(f"\t#{idx} on slot {slot} ({slots[slot] or 'cpu'}): {' '.join(filter_overrides(overrides))}")
                    parent, child = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_run_in_child, args=(cfg, task, state, slots[slot], threads, child),
                                       name=f"hydra-job-{idx}")
                    proc.start()
                    child.close()
                    job = _Running(idx, slot, slots[slot], overrides, proc, parent, job_dir, time.time())
                    running.append(job)
                    _write_info(job, status="RUNNING")
                time.sleep(self.poll_s)
                for job in [j for j in running if not j.process.is_alive() or j.conn.poll()]:
                    results[job.idx] = self._collect(job)
                    running.remove(job)
                    free.append(job.slot)
                    free.sort()
        finally:
            for job in running:  # interrupted: take the children down with the launcher
                job.process.terminate()
                job.process.join(10)
        return [results[i] for i in sorted(results)]

    def _collect(self, job: _Running) -> JobReturn:
        ret = None
        if job.conn.poll(30 if job.process.is_alive() else 1):
            try:
                ret = job.conn.recv()
            except EOFError:
                ret = None
        job.process.join()
        if ret is None:  # the process died before it could answer (killed, out of memory, segfault)
            ret = JobReturn(overrides=list(job.overrides), status=JobStatus.FAILED, working_dir=str(job.job_dir))
            ret.return_value = RuntimeError(f"job #{job.idx} ({' '.join(job.overrides)}) exited with code "
                                            f"{job.process.exitcode} before returning")
            log.error(str(ret._return_value))
        _write_info(job, status=ret.status.name, ended=time.time(), exitcode=job.process.exitcode)
        return ret


def _write_info(job: _Running, **fields) -> None:
    """<job dir>/launcher.json, written atomically: while the job runs, then when it has ended."""
    from var.data.shards import (
        atomic_write_json,  # the project's; imported late to keep plugin discovery light
    )

    job.job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job.job_dir / "launcher.json", {"job": job.idx, "slot": job.slot, "device": job.device,
                                                      "pid": job.process.pid, "started": job.started, **fields})
