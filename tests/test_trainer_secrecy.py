"""The job's randomness is secret (issue 10): one key per job, never published, fresh per run."""

import json
import os
import shutil
import stat
import threading

import numpy as np
import pytest
import yaml
from key_leaks import all_files, find_key

from dptrain.api import InvalidJobError
from dptrain.trainer import (
    Checkpointer,
    FileReporter,
    PoissonSampler,
    Progress,
    TrainingInterruptedError,
    train,
)
from dptrain.trainer._keys import key_fingerprint, read_key


def _flat(directory):
    import jax
    checkpointer = Checkpointer(directory)
    try:
        params = checkpointer.restore_raw()
        meta = checkpointer.read_meta()
    finally:
        checkpointer.close()
    leaves = jax.tree_util.tree_leaves(params)
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves]), meta


class _StopAt:
    def __init__(self, event, step):
        self.event, self.step = event, step

    def known_steps_charged(self):
        return 0

    def record_charge(self, progress):
        pass

    def report(self, progress: Progress):
        if progress.step >= self.step:
            self.event.set()


def test_two_runs_of_the_same_config_differ_in_key_batches_noise_and_model(micro_config,
                                                                          tmp_path):
    a = micro_config(iterations=4, output_dir=tmp_path / "a", checkpoint_dir=tmp_path / "a/c")
    b = micro_config(iterations=4, output_dir=tmp_path / "b", checkpoint_dir=tmp_path / "b/c")
    ra, rb = train(a), train(b)
    key_a, key_b = read_key(a.output_dir / "job.key"), read_key(b.output_dir / "job.key")
    assert len(key_a) == 32 and key_a != key_b
    assert ra.key_fingerprint == key_fingerprint(key_a) != rb.key_fingerprint
    # Same seed, same data: different batches (sampler) and a different model (noise + batches).
    batches = [PoissonSampler(dataset_size=a.dataset_size, expected_batch_size=8,
                              physical_batch_size=32, key=k).sample(0).indices
               for k in (key_a, key_b)]
    assert not np.array_equal(*batches)
    params_a, meta_a = _flat(a.checkpoint_dir)
    params_b, _ = _flat(b.checkpoint_dir)
    assert not np.allclose(params_a, params_b)
    # The checkpoint records the fingerprint, never the key or key-derived state.
    assert meta_a["key_fingerprint"] == ra.key_fingerprint and "root_key" not in meta_a


def test_the_key_file_is_owner_only_created_once_and_kept_on_resume(micro_config):
    config = micro_config()
    stop = threading.Event()
    with pytest.raises(TrainingInterruptedError):
        train(config, reporters=[_StopAt(stop, 6)], stop=stop)
    path = config.output_dir / "job.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    result = train(config)
    assert result.step == 12 and path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime
    assert result.key_fingerprint == key_fingerprint(read_key(path))


def test_resume_without_the_key_is_refused_and_changes_nothing(micro_config):
    config = micro_config()
    stop = threading.Event()
    with pytest.raises(TrainingInterruptedError):
        train(config, reporters=[_StopAt(stop, 4)], stop=stop)
    (config.output_dir / "job.key").unlink()
    ledger = (config.checkpoint_dir / "ledger.json").read_text()
    with pytest.raises(InvalidJobError, match=r"job\.key: the job's secret key is missing"):
        train(config)
    assert not (config.output_dir / "job.key").exists()  # not silently replaced
    assert (config.checkpoint_dir / "ledger.json").read_text() == ledger


def test_a_checkpoint_made_with_another_key_is_refused(micro_config, tmp_path):
    first = micro_config(iterations=4)
    train(first)
    other = micro_config(iterations=4, output_dir=tmp_path / "other",
                         checkpoint_dir=tmp_path / "other-ckpt")
    shutil.copytree(first.checkpoint_dir, other.checkpoint_dir)
    other.output_dir.mkdir()
    (other.output_dir / "job.key").write_text(os.urandom(32).hex())
    with pytest.raises(InvalidJobError, match="another secret job key"):
        train(other)


def test_raw_statistics_stay_private_unless_released_and_are_then_labelled(micro_config,
                                                                         tmp_path):
    raw_keys = {"raw_loss", "real_rows", "clipped_fraction", "mean_grad_norm"}
    private = micro_config(iterations=3)
    result = train(private, reporters=[FileReporter(private.output_dir)])
    history = [json.loads(line) for line in
               (private.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert history and all(not raw_keys & set(h) and h["loss_estimate"] == "dp"
                           for h in history)
    progress = json.loads((private.output_dir / "progress.json").read_text())
    assert "rawLoss" not in progress and "unaccountedRelease" not in progress
    assert not result.raw_statistics_released
    released = micro_config(iterations=3, release_raw_statistics=True,
                            output_dir=tmp_path / "raw", checkpoint_dir=tmp_path / "raw-ckpt")
    train(released, reporters=[FileReporter(released.output_dir)])
    history = [json.loads(line) for line in
               (released.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(raw_keys <= set(h) and h["unaccounted_release"] for h in history)
    progress = json.loads((released.output_dir / "progress.json").read_text())
    assert "outside ε" in progress["unaccountedRelease"]


@pytest.mark.slow
def test_no_artefact_of_a_local_run_contains_the_key(tmp_path, capsys, caplog):
    """`dptrain run` of a tiny manifest: every file it writes, its output and logs."""
    from dptrain.cli import main
    manifest = yaml.safe_load((__import__("pathlib").Path(__file__).parents[1] / "manifests"
                               / "samples" / "tiny-cpu.yaml").read_text())
    manifest["spec"]["training"].update(batchSize=8, iterations=3, warmupSteps=1)
    manifest["spec"]["data"]["sequenceLength"] = 32
    manifest["spec"]["checkpoint"]["intervalSteps"] = 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out"
    caplog.set_level("DEBUG")
    assert main(["run", str(path), "--output", str(out), "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    key = read_key(out / "job.key")
    report = json.loads((out / "report.json").read_text())
    assert report["key_fingerprint"] == key_fingerprint(key)
    files = all_files(out, exclude=[out / "job.key"])
    names = {f.name for f in files}
    assert {"report.json", "metrics.jsonl", "progress.json", "loss.png", "ledger.json"} <= names
    assert any(f.parent.name == "meta" or "meta" in f.name for f in files)  # checkpoint metadata
    hits = find_key(key, files, {"stdout": captured.out, "stderr": captured.err,
                                 "logs": caplog.text})
    assert hits == []
    # The search can fail: the key file itself is found.
    assert find_key(key, [out / "job.key"]) == [f"{out / 'job.key'}: hex"]
