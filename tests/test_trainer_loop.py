"""The training loop: resume, ledger ordering, re-charging, and the budget guard."""

import json
import shutil

import numpy as np
import pytest

from dptrain.api import InvalidJobError
from dptrain.privacy import epsilon
from dptrain.trainer import (
    BUDGET_EXHAUSTED,
    SUCCEEDED,
    Checkpointer,
    Progress,
    TrainingInterruptedError,
    mechanism_for,
    train,
)
from dptrain.trainer import _checkpoint as checkpoint_module
from dptrain.trainer import _ledger as ledger_module


def final_params(config):
    checkpointer = Checkpointer(config.checkpoint_dir)
    try:
        meta = checkpointer.read_meta()
        restored = checkpointer.restore_raw(meta["step"])
    finally:
        checkpointer.close()
    return meta, restored


def flat(tree):
    import jax
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_shape, micro_dataset):
    """One uninterrupted 12-step run, shared by the tests that compare against it."""
    from dptrain.trainer import TrainConfig
    base = tmp_path_factory.mktemp("reference")
    config = TrainConfig.pinned(
        job_name="micro", shape=micro_shape, data_dir=micro_dataset.directory,
        dataset_size=micro_dataset.num_sequences, sequence_length=16, batch_size=8,
        physical_batch_size=32, iterations=12, noise_multiplier=1.0, clip_norm=1.0,
        learning_rate=1e-2, warmup_steps=2, weight_decay=0.0, optimizer="adamw",
        microbatch_size=None, seed=0, epsilon_budget=50.0, delta=1e-5, accountant="rdp",
        checkpoint_dir=base / "ckpt", checkpoint_interval=4, checkpoint_keep=5,
        output_dir=base / "out", progress=False, release_raw_statistics=True)
    result = train(config)
    return config, result, flat(final_params(config)[1])


class StopAfter:
    """A reporter that asks the loop to stop once a step is reached (like SIGTERM)."""

    def __init__(self, event, step):
        self.event, self.step = event, step

    def known_steps_charged(self):
        return 0

    def record_charge(self, progress):
        pass

    def report(self, progress: Progress):
        if progress.step >= self.step:
            self.event.set()


def test_uninterrupted_run_succeeds_with_falling_loss(reference):
    config, result, _ = reference
    assert result.end_state == SUCCEEDED and result.exit_code == 0
    assert result.step == result.steps_charged == 12
    assert result.epsilon_spent == pytest.approx(epsilon(mechanism_for(config), 12))
    # The raw loss (opted in here): the DP estimate at B = 8 has a noise std of ~5 nats.
    losses = [h["raw_loss"] for h in result.history]
    assert np.mean(losses[-3:]) < losses[0] - 0.1


def test_resume_after_interruption_is_bit_identical(reference, micro_config):
    import threading
    # The same job: the same secret key as the uninterrupted reference run.
    config = micro_config(key_file=reference[0].output_dir / "job.key")
    stop = threading.Event()
    with pytest.raises(TrainingInterruptedError):
        train(config, reporters=[StopAfter(stop, 6)], stop=stop)
    assert Checkpointer(config.checkpoint_dir).latest_step() == 6
    result = train(config)
    assert result.end_state == SUCCEEDED and result.step == 12
    assert result.steps_charged == 12
    assert np.array_equal(flat(final_params(config)[1]), reference[2])


def test_restart_from_an_older_checkpoint_charges_repeated_steps_again(reference, micro_config):
    config = micro_config(key_file=reference[0].output_dir / "job.key")
    shutil.copytree(reference[0].checkpoint_dir, config.checkpoint_dir)
    for step in (8, 12):  # a crash lost the newer checkpoints, not the ledger (12 charged)
        shutil.rmtree(config.checkpoint_dir / str(step))
    result = train(config)
    assert result.step == 12
    assert result.steps_charged == 12 + 8  # steps 5..12 ran twice and are charged twice
    ledger = json.loads((config.checkpoint_dir / "ledger.json").read_text())
    assert ledger["steps_charged"] == 20
    assert result.epsilon_spent == pytest.approx(epsilon(mechanism_for(config), 20))
    # The repeated steps are new executions (12..19): fresh batches and fresh noise, which is
    # what their second charge pays for, so the model differs from the reference.
    history = [json.loads(line) for line in (config.output_dir / "metrics.jsonl")
               .read_text().splitlines()]
    assert [h["steps_charged"] for h in history[-8:]] == list(range(13, 21))
    assert not np.allclose(flat(final_params(config)[1]), reference[2])


def test_the_ledger_is_durable_before_every_checkpoint(micro_config, monkeypatch):
    config = micro_config()
    events = []
    original_save = checkpoint_module.Checkpointer.save
    original_write = ledger_module.LedgerFile.write

    def save(self, step, params, opt_state, meta):
        on_disk = json.loads((config.checkpoint_dir / "ledger.json").read_text())
        events.append(("checkpoint", step, meta["ledger"]["steps_charged"],
                       on_disk["steps_charged"]))
        return original_save(self, step, params, opt_state, meta)

    def write(self, ledger, eps):
        events.append(("ledger", ledger.steps_charged))
        return original_write(self, ledger, eps)

    monkeypatch.setattr(checkpoint_module.Checkpointer, "save", save)
    monkeypatch.setattr(ledger_module.LedgerFile, "write", write)
    train(config)
    saves = [e for e in events if e[0] == "checkpoint"]
    assert [s[1] for s in saves] == [4, 8, 12]
    for _, step, meta_count, disk_count in saves:
        assert disk_count >= meta_count >= step  # fsynced ledger already counts every step
    # Every step was reserved before it ran: the ledger grew one step at a time, 1..12.
    assert [e[1] for e in events if e[0] == "ledger"] == list(range(1, 13))


def test_budget_guard_stops_at_the_last_step_within_budget(micro_config):
    probe = micro_config()
    mechanism = mechanism_for(probe)
    budget = (epsilon(mechanism, 7) + epsilon(mechanism, 8)) / 2
    config = micro_config(epsilon_budget=budget)
    result = train(config)
    assert result.end_state == BUDGET_EXHAUSTED and result.exit_code == 4
    assert result.step == result.steps_charged == 7
    assert result.epsilon_spent <= budget < epsilon(mechanism, 8)
    assert Checkpointer(config.checkpoint_dir).latest_step() == 7  # saved where it stopped


def test_resume_never_starts_below_the_recorded_count(micro_config):
    probe = micro_config()
    mechanism = mechanism_for(probe)
    budget = (epsilon(mechanism, 11) + epsilon(mechanism, 12)) / 2
    # The operator's ledger says 9 steps were charged before this (fresh) pod started.
    result = train(micro_config(epsilon_budget=budget, initial_steps_charged=9))
    assert result.end_state == BUDGET_EXHAUSTED
    assert result.steps_charged == 11 and result.step == 2


def test_a_budget_too_small_for_one_step_fails_before_training(micro_config):
    probe = micro_config()
    budget = epsilon(mechanism_for(probe), 1) / 2
    config = micro_config(epsilon_budget=budget)
    with pytest.raises(InvalidJobError, match=r"spec\.privacy\.epsilon: is too small"):
        train(config)
    assert not (config.checkpoint_dir / "ledger.json").exists()
    assert Checkpointer(config.checkpoint_dir).latest_step() is None
