"""The console script restarts itself with a faster C allocator (cli/_allocator.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from dptrain.cli._allocator import (
    CHOICE,
    JEMALLOC_CONF,
    OPT_OUT,
    TUNABLE,
    find_jemalloc,
    tuned_environment,
)

GLIBC = ("glibc", "2.36")
JEMALLOC = "libjemalloc.so.2"


def _tuned(env, *, system="Linux", libc=GLIBC, jemalloc=None):
    return tuned_environment(env, system=system, libc=libc, jemalloc=lambda: jemalloc)


def test_the_tunable_is_added_once_and_other_tunables_are_kept():
    assert _tuned({}) == {"GLIBC_TUNABLES": TUNABLE}
    env = _tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}", "HOME": "/h"}
    # Already there (re-executed, or set by the image): no second restart.
    assert _tuned(env) is None


def test_jemalloc_is_preloaded_where_found_with_its_configuration_unless_the_user_set_one():
    env = _tuned({"LD_PRELOAD": "/opt/libhook.so"}, jemalloc=JEMALLOC)
    assert env == {"LD_PRELOAD": f"{JEMALLOC}:/opt/libhook.so", "MALLOC_CONF": JEMALLOC_CONF,
                   "GLIBC_TUNABLES": TUNABLE}
    assert _tuned(env, jemalloc=JEMALLOC) is None  # re-executed: no second restart
    own = _tuned({"MALLOC_CONF": "narenas:4"}, jemalloc=JEMALLOC)
    assert own is not None and own["MALLOC_CONF"] == "narenas:4"
    # Without glibc's tunable (old glibc, musl), jemalloc alone still applies.
    assert _tuned({}, libc=("", ""), jemalloc=JEMALLOC) == {"LD_PRELOAD": JEMALLOC,
                                                           "MALLOC_CONF": JEMALLOC_CONF}
    # DPTRAIN_MALLOC=glibc: huge pages only, even where jemalloc is installed.
    assert _tuned({CHOICE: "glibc"}, jemalloc=JEMALLOC) == {CHOICE: "glibc",
                                                           "GLIBC_TUNABLES": TUNABLE}


def test_nothing_changes_where_nothing_applies_or_the_user_chose():
    assert _tuned({}, system="Darwin", libc=("", ""), jemalloc=JEMALLOC) is None
    assert _tuned({}, libc=("glibc", "2.31")) is None  # too old, no jemalloc
    assert _tuned({}, libc=("", "")) is None  # musl, no jemalloc
    assert _tuned({OPT_OUT: "0"}, jemalloc=JEMALLOC) is None
    assert _tuned({CHOICE: "off"}, jemalloc=JEMALLOC) is None
    assert _tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, jemalloc=JEMALLOC) is None
    assert _tuned({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, jemalloc=JEMALLOC) is None


def test_the_library_is_looked_up_only_when_the_environment_does_not_decide():
    def unexpected():
        raise AssertionError("looked up jemalloc")

    # Already re-executed, the user's own allocator, huge pages only, or off: no lookup.
    for env in ({"GLIBC_TUNABLES": TUNABLE}, {"LD_PRELOAD": JEMALLOC}, {CHOICE: "glibc"},
                {CHOICE: "off"}):
        tuned_environment(env, system="Linux", libc=GLIBC, jemalloc=unexpected)


def test_a_bad_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="DPTRAIN_MALLOC must be auto, glibc or off"):
        _tuned({CHOICE: "tcmalloc"})


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, "--flag", "value"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)


def test_the_process_restarts_with_its_arguments_and_the_allocator():
    code = ("import os, sys; from dptrain.cli._allocator import reexec_with_fast_allocator; "
            "print('start', flush=True); reexec_with_fast_allocator(); "
            "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('LD_PRELOAD'), "
            "sys.argv[1:])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", CHOICE, OPT_OUT)}
    out = _run(code, env).stdout.split("\n")
    expected = tuned_environment(env, system=platform.system(), libc=platform.libc_ver(),
                                 jemalloc=find_jemalloc)
    if expected is None:  # neither glibc >= 2.35 nor jemalloc: the process just goes on
        assert out[:2] == ["start", "None None ['--flag', 'value']"]
    else:  # printed once before the restart, then again by the restarted process
        assert out[:3] == ["start", "start", f"{expected.get('GLIBC_TUNABLES')} "
                           f"{expected.get('LD_PRELOAD')} ['--flag', 'value']"]
    opted_out = _run(code, {**env, CHOICE: "off"}).stdout.split("\n")
    assert opted_out[:2] == ["start", "None None ['--flag', 'value']"]
