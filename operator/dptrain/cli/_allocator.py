"""Start the command with a C allocator that keeps XLA:CPU's step memory mapped between steps.

XLA:CPU allocates each step's temporaries afresh (one block of a few hundred MB at the peers'
benchmark shape, ``bench/peers``) and frees them at the end. glibc serves a block that large with
a new ``mmap`` and returns it with ``munmap``, so every step first faults in and zero-fills its
whole working set: at 4 KiB pages about 80,000 faults a step, 16-20 % of its CPU time; on huge
pages 12× fewer faults but still ~12 % of the CPU in the kernel's ``clear_page`` (``perf``), and
the DP step's per-example gradients, written once into fresh pages, took 91 ms a step on the
peers' shape against 65 ms in reused memory (the 14 batched products timed alone, side by
side). Two remedies, in order of preference:

* **jemalloc** (``libjemalloc.so.2``, where installed: Debian/Ubuntu ``libjemalloc2``, the trainer
  image) preloaded with ``MALLOC_CONF=`` :data:`JEMALLOC_CONF`: transparent huge pages, no
  separate arena for huge blocks (``oversize_threshold:0``; that arena would return them at once)
  and freed pages kept for a minute (``dirty_decay_ms``), so a step's blocks come back already
  mapped. Measured side by side (``python bench/peers/run.py --malloc jemalloc``): both of
  dptrain's steps ~11 % faster than on glibc's huge pages.
* glibc's malloc on transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc ≥
  2.35): the non-private step ~20 % and the DP step 5-20 % faster than glibc's defaults. (glibc
  cannot keep such blocks: its ``mmap_threshold`` stops at 32 MiB, and forcing them onto the main
  heap with ``mmap_max=0`` and one arena serialises every thread's small allocations on one lock,
  which cost the DP step what it saved.)

The allocator is chosen when the process starts, so the console script re-executes itself once
with the variables added (before its heavy imports: a few milliseconds); the trainer image sets
them in its environment and is not re-executed. Training's numbers are unchanged (only where
memory comes from changes: three ghost DP steps give bit-identical parameters under either).
``DPTRAIN_MALLOC`` chooses: ``auto`` (default: jemalloc where found, else glibc's huge pages),
``glibc`` (huge pages only) or ``off``; ``DPTRAIN_HUGE_PAGES=0`` (the older switch) means ``off``.
A user's own ``LD_PRELOAD`` of an allocator, ``MALLOC_CONF`` or ``glibc.malloc.hugetlb`` setting
is kept, and nothing happens off Linux or on glibc older than 2.35 without jemalloc.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from collections.abc import Callable, Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
JEMALLOC_CONF = "thp:always,oversize_threshold:0,dirty_decay_ms:60000,muzzy_decay_ms:60000"
CHOICE = "DPTRAIN_MALLOC"
OPT_OUT = "DPTRAIN_HUGE_PAGES"  # "0": off (the switch of earlier versions)
_MIN_GLIBC = (2, 35)
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # preloaded by the user: keep theirs


def _glibc_tunable_applies(libc: tuple[str, str]) -> bool:
    name, version = libc
    try:
        numbers = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and numbers >= _MIN_GLIBC


def tuned_environment(env: Mapping[str, str], *, system: str, libc: tuple[str, str],
                      jemalloc: Callable[[], str | None]) -> dict[str, str] | None:
    """``env`` with the allocator's variables added, or None when nothing should change.

    Args:
        env: the process environment.
        system: ``platform.system()``.
        libc: ``platform.libc_ver()`` (name, version).
        jemalloc: finds the jemalloc library to preload (a path or soname; None where not
            installed); called only when the environment does not already decide (the lookup
            runs ``ldconfig``, 5-25 ms, and must not run again after the re-execution).

    Raises:
        ValueError: ``DPTRAIN_MALLOC`` is not ``auto``, ``glibc`` or ``off``.
    """
    choice = env.get(CHOICE, "auto")
    if choice not in ("auto", "glibc", "off"):
        raise ValueError(f"{CHOICE} must be auto, glibc or off (got {choice!r})")
    if system != "Linux" or choice == "off" or env.get(OPT_OUT, "1") == "0":
        return None
    preload, tunables = env.get("LD_PRELOAD", ""), env.get("GLIBC_TUNABLES", "")
    if any(name in preload for name in _ALLOCATORS) or "glibc.malloc.hugetlb=" in tunables:
        return None  # the user's own choice, or already re-executed
    out = dict(env)
    if _glibc_tunable_applies(libc):
        out["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    library = jemalloc() if choice == "auto" else None
    if library is not None:
        out["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
        out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return out if out != env else None


def find_jemalloc() -> str | None:
    """The jemalloc library's soname where the dynamic linker finds it (``ldconfig``), or None."""
    return ctypes.util.find_library("jemalloc")


def reexec_with_fast_allocator() -> None:
    """Re-execute this process (same interpreter, options and arguments) with the allocator set.

    Returns only when nothing needs to change (see :func:`tuned_environment`).
    """
    env = tuned_environment(os.environ, system=platform.system(), libc=platform.libc_ver(),
                            jemalloc=find_jemalloc)
    if env is None or not sys.orig_argv or not sys.executable:  # embedded: nothing to re-run
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
