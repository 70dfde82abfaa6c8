"""Multi-host start-up: ``jax.distributed.initialize`` from the pod's environment.

The operator gives every trainer pod ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With more than one process, all processes join one
global device mesh; each computes the same sampled batch and feeds the rows of its own devices,
and only process 0 writes the ledger, reports and metrics.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from dptrain.api import ENV_JAX_COORDINATOR, ENV_JAX_NUM_PROCESSES, ENV_JAX_PROCESS_ID


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessInfo:
    """This process's place in a (possibly single-process) job."""

    process_id: int
    num_processes: int

    @property
    def is_leader(self) -> bool:
        """Process 0 writes the ledger, checkpoints metadata and reports."""
        return self.process_id == 0


def distributed_env(env: dict[str, str] | None = None) -> tuple[str, int, int] | None:
    """``(coordinator, num_processes, process_id)`` from the environment, or ``None``.

    Raises:
        ValueError: naming the variable, when the variables are incomplete or malformed.
    """
    env = dict(os.environ if env is None else env)
    address = env.get(ENV_JAX_COORDINATOR)
    if not address:
        return None
    try:
        count = int(env.get(ENV_JAX_NUM_PROCESSES, "1"))
        index = int(env.get(ENV_JAX_PROCESS_ID, "0"))
    except ValueError:
        raise ValueError(f"{ENV_JAX_NUM_PROCESSES} and {ENV_JAX_PROCESS_ID} must be integers"
                         ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{ENV_JAX_PROCESS_ID} ({index}) must be in [0, "
                         f"{ENV_JAX_NUM_PROCESSES}={count})")
    return address, count, index


def initialize_from_env(env: dict[str, str] | None = None) -> ProcessInfo:
    """Join the multi-host job described by the environment (no-op for one process)."""
    config = distributed_env(env)
    if config is None or config[1] == 1:
        return ProcessInfo(process_id=0, num_processes=1)
    address, count, index = config
    # CPU collectives across processes need gloo (the default is single-process only); the
    # setting affects only the CPU backend, so it is harmless on accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
    return ProcessInfo(process_id=jax.process_index(), num_processes=jax.process_count())
