"""Start the command with glibc's malloc on transparent huge pages (``glibc.malloc.hugetlb=1``).

XLA:CPU allocates each step's temporaries afresh, and glibc serves those large blocks with new
``mmap`` regions, so every step first takes a page fault per 4 KiB of its working set: about 80,000
a step at the peers' benchmark shape (``bench/peers``), 16-20 % of the step's CPU time. With the
tunable, glibc asks the kernel for transparent huge pages on those regions (``madvise``: this works
where THP is ``madvise`` or ``always``), 2 MiB at a time: measured side by side on the benchmark
(``python bench/peers/run.py``), the non-private step ran 20 % and the DP step 5-20 % faster, with
12× fewer page faults. Training's numbers are unchanged: only where memory comes from changes.

glibc reads its tunables once, when the process starts, so the console script re-executes
itself with the variable added (before its heavy imports: a few milliseconds); the trainer image
sets it in its environment and is not re-executed. Nothing happens when the variable already names
the tunable, when the C library is not glibc 2.35 or newer (older versions ignore it), off Linux,
or when ``DPTRAIN_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DPTRAIN_HUGE_PAGES"
_MIN_GLIBC = (2, 35)


def tuned_environment(env: Mapping[str, str], *, system: str, libc: tuple[str, str]
                      ) -> dict[str, str] | None:
    """``env`` with the tunable added to ``GLIBC_TUNABLES``, or None when nothing should change.

    Args:
        env: the process environment.
        system: ``platform.system()``.
        libc: ``platform.libc_ver()`` (name, version).
    """
    if system != "Linux" or env.get(OPT_OUT, "1") == "0":
        return None
    name, version = libc
    try:
        numbers = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or numbers < _MIN_GLIBC:
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in current:  # the user's own choice (or already re-executed)
        return None
    return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Re-execute this process (same interpreter, options and arguments) with the tunable set.

    Returns only when nothing needs to change (see :func:`tuned_environment`).
    """
    env = tuned_environment(os.environ, system=platform.system(), libc=platform.libc_ver())
    if env is None or not sys.orig_argv or not sys.executable:  # embedded: nothing to re-run
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
