"""The console script restarts itself with glibc's malloc on huge pages (cli/_huge_pages.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from dptrain.cli._huge_pages import OPT_OUT, TUNABLE, tuned_environment

GLIBC = ("glibc", "2.36")


def test_the_tunable_is_added_once_and_other_tunables_are_kept():
    assert tuned_environment({}, system="Linux", libc=GLIBC) == {"GLIBC_TUNABLES": TUNABLE}
    env = tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"},
                            system="Linux", libc=GLIBC)
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}", "HOME": "/h"}
    # Already there (re-executed, or set by the image): no second restart.
    assert tuned_environment(env, system="Linux", libc=GLIBC) is None


def test_nothing_changes_where_the_tunable_does_not_apply_or_the_user_chose():
    assert tuned_environment({}, system="Darwin", libc=("", "")) is None
    assert tuned_environment({}, system="Linux", libc=("glibc", "2.31")) is None  # too old
    assert tuned_environment({}, system="Linux", libc=("", "")) is None  # musl
    assert tuned_environment({OPT_OUT: "0"}, system="Linux", libc=GLIBC) is None
    assert tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, system="Linux",
                             libc=GLIBC) is None


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, "--flag", "value"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)


def test_the_process_restarts_with_its_arguments_and_the_tunable():
    code = ("import os, sys; from dptrain.cli._huge_pages import reexec_with_huge_pages; "
            "print('start', flush=True); reexec_with_huge_pages(); "
            "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    out = _run(code, env).stdout.split("\n")
    expected = tuned_environment(env, system=platform.system(), libc=platform.libc_ver())
    if expected is None:  # not glibc >= 2.35 on Linux: the process just goes on
        assert out[:2] == ["start", "None ['--flag', 'value']"]
    else:  # printed once before the restart, then again by the restarted process
        assert out[:3] == ["start", "start", f"{TUNABLE} ['--flag', 'value']"]
    opted_out = _run(code, {**env, OPT_OUT: "0"}).stdout.split("\n")
    assert opted_out[:2] == ["start", "None ['--flag', 'value']"]
