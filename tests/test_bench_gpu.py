"""``bench/gpu.sh``, the accelerator benchmark, runs end to end (``--dry``: CPU, stand-in shapes).

No accelerator reaches CI, so this is what keeps the prepared script from rotting between the
runs on one: every shape is compiled and timed for both steps, and the table's ratios are the
ones its own figures give.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Compiles six steps (three shapes, DP and non-private): ~20 s on 2 shared cores.
pytestmark = pytest.mark.slow


def test_gpu_script_dry_run_times_every_shape_for_both_steps():
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry", "--json"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["device"] == "cpu"
    rows = {row["shape"]: row for row in report["results"]}
    assert set(rows) == {"small", "base", "vaultgemma-1b"}
    assert rows["vaultgemma-1b"]["microbatch"] is not None  # the 1B shape runs microbatched
    for row in rows.values():
        plain, dp = row["non_private"], row["dp"]
        assert plain["tokens_per_s"] > 0 and dp["tokens_per_s"] > 0
        assert plain["compiled_memory_gb"] > 0 and dp["compiled_memory_gb"] > 0
        # DP / non-private step time is the inverse ratio of the throughputs (1e-9 relative).
        assert row["dp_over_non_private_time"] == pytest.approx(
            plain["tokens_per_s"] / dp["tokens_per_s"], rel=1e-9)
