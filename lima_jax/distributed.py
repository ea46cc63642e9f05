"""Multi-host start-up and barriers that fail loudly instead of hanging.

Every host of a pod slice runs the same `python -m lima_jax.train ...`. `initialize()` connects them:

* Cloud TPU (several workers), SLURM, Open MPI: `jax.distributed.initialize()` finds the coordinator,
  process count and id by itself.
* Anywhere else: `--coordinator_address=host:port --num_processes=N --process_id=i` (the flags of
  `lima_jax.cli.add_distributed_flags`), or the environment
  variables LIMA_COORDINATOR_ADDRESS / LIMA_NUM_PROCESSES / LIMA_PROCESS_ID.
* A single process: nothing to do.

Both the connection and every `barrier()` have a timeout; when it runs out the error says which process
waited for what, and what usually causes it (a host that crashed earlier, or did not run the command).
"""
from __future__ import annotations

import itertools
import os
import socket
import sys
import time

import jax
import numpy as np
from absl import logging

from lima_jax.errors import DistributedError

_barrier_ids = itertools.count()
_barrier_timeout_s = 300  # set by initialize()


def _on_cloud_tpu_vm() -> bool:
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # jax's own check (TPU chips present)
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def _auto_detected_cluster() -> bool:
    """True where jax.distributed finds the cluster by itself (Cloud TPU VMs, SLURM, Open MPI)."""
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (_on_cloud_tpu_vm() or "," in tpu_workers or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
            or int(os.environ.get("SLURM_NTASKS", "1")) > 1
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300, cpu_collectives: str | None = None) -> None:
    """Connects this process to the others (see the module docstring); a no-op for a single process.
    `timeout_s` also becomes the default timeout of every `barrier`."""
    global _barrier_timeout_s
    _barrier_timeout_s = int(timeout_s)
    coordinator_address = coordinator_address or os.environ.get("LIMA_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("LIMA_NUM_PROCESSES"):
        num_processes = int(os.environ["LIMA_NUM_PROCESSES"])
    if process_id is None and os.environ.get("LIMA_PROCESS_ID"):
        process_id = int(os.environ["LIMA_PROCESS_ID"])
    cpu_collectives = cpu_collectives or os.environ.get("LIMA_CPU_COLLECTIVES") or None
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _auto_detected_cluster():
        return
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise DistributedError(
            f"multi-host run needs all of --coordinator_address, --num_processes, --process_id (or the "
            f"LIMA_* environment variables); got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if explicit and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    where = coordinator_address or "the auto-detected coordinator"
    if coordinator_address and process_id:
        _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
    # jaxlib aborts the process (no Python exception) when the others do not show up in time: say first
    # what is being waited for, so that the log explains the abort.
    print(f"lima_jax.distributed: process {process_id if process_id is not None else '?'} of "
          f"{num_processes or '?'} joining the job at {where}; all processes must join within {timeout_s}s "
          "(--distributed_timeout_s), else the process aborts with DEADLINE_EXCEEDED", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout_s))
    except Exception as e:  # jaxlib raises its own XlaRuntimeError types; re-raise with the context
        raise DistributedError(
            f"process {process_id if process_id is not None else '?'} of {num_processes or '?'} could not join "
            f"the job at {where} within {timeout_s}s ({type(e).__name__}: {e}). Check that every host runs the "
            f"same command, that process 0 is up and its port is reachable, and that process ids are "
            f"distinct.") from e
    logging.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _wait_for_coordinator(address: str, timeout_s: float, process_id: int, num_processes: int) -> None:
    """Waits until process 0's coordinator port accepts connections; DistributedError after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {process_id} of {num_processes} could not reach the coordinator at {address} within "
                    f"{timeout_s}s ({e}). Check that process 0 runs the same command and that its port is "
                    "reachable from this host.") from e
            time.sleep(0.5)


def barrier_timeout_s() -> int:
    return _barrier_timeout_s


def barrier(name: str, timeout_s: int | None = None) -> None:
    """Waits until every process reaches the barrier `name`, or raises DistributedError after `timeout_s`."""
    if jax.process_count() == 1:
        return
    client = _client(f"barrier {name!r}")
    timeout_s = barrier_timeout_s() if timeout_s is None else timeout_s
    barrier_id = f"lima_{name}_{next(_barrier_ids)}"  # all processes call barriers in the same order
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as e:
        raise DistributedError(
            f"process {jax.process_index()} of {jax.process_count()} waited {timeout_s}s at barrier {name!r} "
            f"and not every process arrived ({type(e).__name__}: {e}). Another host probably failed earlier: "
            f"look at its log.") from e


def _client(what: str):
    """jax.distributed's coordination client (not exported publicly); DistributedError if not connected."""
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError(f"{what}: jax.distributed is not initialized")
    return client


def main_process_text(name: str, text: str, timeout_s: int | None = None) -> str:
    """Host 0's `text` on every host (the other hosts' `text` is ignored), through the coordinator's key-value
    store: no device work, so it serves decisions taken before anything is compiled. Every host calls it
    with the same `name`, in the same order; DistributedError when host 0 does not send within `timeout_s`."""
    if jax.process_count() == 1:
        return text
    client = _client(f"message {name!r}")
    key = f"lima_{name}_{next(_barrier_ids)}"
    if is_main_process():
        client.key_value_set(key, text)
        return text
    timeout_s = barrier_timeout_s() if timeout_s is None else timeout_s
    try:
        return client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:
        raise DistributedError(
            f"process {jax.process_index()} of {jax.process_count()} waited {timeout_s}s for process 0's "
            f"{name!r} and it did not come ({type(e).__name__}: {e}). Process 0 probably failed earlier: look at "
            "its log.") from e


def is_main_process() -> bool:
    """Host 0: the one that logs, writes metrics and prints reports."""
    return jax.process_index() == 0


def main_process_says(value: bool) -> bool:
    """Host 0's `value` on every host: for decisions that read files only host 0 writes, so that all hosts
    take the same branch into collective work."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process: for verdicts each host reaches on its own share of the work."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def process_rows(values: list[int]) -> np.ndarray:
    """Every process's `values` (small ints, the same length everywhere) as rows of a (process_count, n) array,
    row i from process i: for per-step decisions every host must take alike. One tiny all-gather."""
    row = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return row[None]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), len(values))


def reached_preemption_sync_point(step: int) -> bool:
    """JAX's preemption notice (`multihost_utils.reached_preemption_sync_point`, as orbax wraps it): True at the
    one step every host reaches after jax.distributed's preemption service saw a notice (a SIGTERM that arrived
    while JAX's own handler was installed). False without jax.distributed or with the service disabled. All
    hosts must call it at every step, from the same first step."""
    from jax.experimental import multihost_utils
    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # jax_enable_preemption_service is off
        return False
