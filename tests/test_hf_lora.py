"""LoRA fine-tuning end to end: the finetune-cpu sample (shortened) on a script-made checkpoint,
then export merged (transformers) and adapter-only (PEFT), both equal to dptrain's logits."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from dptrain.api import load_job, validate_job
from dptrain.cli._main import main
from dptrain.trainer._checkpoint import Checkpointer
from dptrain.trainer._export import load_checkpoint_model
from dptrain.trainer._hf import load_pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "manifests" / "samples" / "finetune-cpu.yaml"
PROMPTS = [[1, 72, 101, 108, 108, 111, 44, 32], [1, 5, 9, 200, 7, 7, 7, 31, 44, 12, 90, 3, 250]]


def _logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor([tokens])).logits[0].numpy()


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_pretrained",
                                                  ROOT / "scripts" / "make-tiny-pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_sample_validates_and_trains_adapters():
    job = load_job(SAMPLE)
    validate_job(job)
    lora = job.spec.training.lora
    assert lora is not None and lora.rank == 8 and set(lora.targets) == {
        "q", "k", "v", "o", "gate", "up", "down"}
    assert job.spec.model.pretrained is not None
    assert job.spec.data.tokenizer == "huggingface"


def test_lora_needs_a_pretrained_model():
    from dptrain.api import InvalidJobError

    raw = yaml.safe_load(SAMPLE.read_text())
    del raw["spec"]["model"]
    raw["spec"]["model"] = {"preset": "tiny"}
    raw["spec"]["data"]["tokenizer"] = "byte"
    from dptrain.api import parse_job

    with pytest.raises(InvalidJobError, match=r"spec\.training\.lora.*pretrained"):
        validate_job(parse_job(raw))
    raw = yaml.safe_load(SAMPLE.read_text())
    raw["spec"]["training"]["lora"]["targets"] = ["q", "v", "q"]
    with pytest.raises(InvalidJobError, match=r"spec\.training\.lora\.targets.*at most once"):
        validate_job(parse_job(raw))
    raw["spec"]["training"]["lora"]["targets"] = ["qkv"]
    with pytest.raises(InvalidJobError, match="targets"):
        parse_job(raw)


def _write(directory, raw):
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The sample, shortened, run with `dptrain run` on a tiny checkpoint from the script."""
    tmp = tmp_path_factory.mktemp("lora")
    assert _script().main([str(tmp / "tiny-vaultgemma"), "--vocab-size", "300",
                           "--tokenizer-files", "6", "--max-positions", "64"]) == 0
    raw = yaml.safe_load(SAMPLE.read_text())
    raw["spec"]["data"]["sequenceLength"] = 32
    # Warm-up from 0: the first step cannot move the adapters, the check must wait for step 2.
    raw["spec"]["training"].update(batchSize=16, iterations=4, warmupSteps=1)
    raw["spec"]["checkpoint"] = {"intervalSteps": 4, "keep": 1}
    run = tmp / "run"
    assert main(["run", str(_write(tmp, raw)), "--output", str(run), "--json",
                 "--no-progress"]) == 0
    return tmp, run


@pytest.mark.slow
def test_lora_run_keeps_the_base_and_moves_the_adapters(finetuned):
    tmp, run = finetuned
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 4
    # The checkpoint holds the adapters and nothing else.
    checkpointer = Checkpointer(run / "checkpoints")
    raw = checkpointer.restore_raw()
    checkpointer.close()
    leaves = jax.tree_util.tree_leaves_with_path(raw)
    assert leaves and all("lora" in jax.tree_util.keystr(path) for path, _ in leaves)
    model, meta = load_checkpoint_model(run / "checkpoints", merged=False)
    assert meta["lora"] == {"rank": 8, "alpha": 16.0, "targets": ["q", "k", "v", "o", "gate",
                                                                  "up", "down"]}
    base, _ = load_pretrained(tmp / "tiny-vaultgemma")
    assert model.lora is not None
    for target, b in model.lora.b.items():
        assert float(np.max(np.abs(np.asarray(b)))) > 0, target  # B started at zero
    unadapted = jax.tree_util.tree_leaves(_without_adapters(model))
    for a, e in zip(unadapted, jax.tree_util.tree_leaves(base), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(e))  # bit-identical base


def _without_adapters(model):
    import equinox as eqx

    return eqx.tree_at(lambda m: m.lora, model, None)


@pytest.mark.slow
def test_merged_and_adapter_exports_equal_dptrain(finetuned, capsys):
    tmp, run = finetuned
    model, _ = load_checkpoint_model(run / "checkpoints", merged=False)
    capsys.readouterr()
    merged_dir, adapter_dir = tmp / "export", tmp / "adapter"
    assert main(["export", str(run / "checkpoints"), "--output", str(merged_dir)]) == 0
    capsys.readouterr()
    assert main(["export", str(run / "checkpoints"), "--output", str(adapter_dir),
                 "--adapter-only", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "peft-lora"
    assert set(summary["files"]) >= {"adapter_config.json", "adapter_model.safetensors",
                                     "README.md", "tokenizer.json"}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp / "tiny-vaultgemma",
                                                attn_implementation="eager").eval()
    # PEFT's format: key names and shapes ([r, in] / [out, r]) of every layer and target.
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16.0)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * base.config.num_hidden_layers
    q_a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    q_b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert q_a.shape == (8, base.config.hidden_size)
    assert q_b.shape == (base.config.num_attention_heads * base.config.head_dim, 8)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    card = (merged_dir / "README.md").read_text()
    assert "ε (spent)" in card and "Only low-rank (LoRA) adapters were trained (rank 8" in card
    for tokens in PROMPTS:
        ours = np.asarray(model(jax.numpy.asarray(tokens)))  # unmerged adapters
        assert np.max(np.abs(_logits(merged, tokens) - ours)) < 1e-4
        assert np.max(np.abs(_logits(peft_model, tokens) - ours)) < 1e-4
    # The adapters do something: the base alone differs.
    base_again = AutoModelForCausalLM.from_pretrained(tmp / "tiny-vaultgemma",
                                                      attn_implementation="eager").eval()
    assert np.max(np.abs(_logits(base_again, PROMPTS[0])
                         - np.asarray(model(jax.numpy.asarray(PROMPTS[0]))))) > 1e-6


@pytest.mark.slow
def test_a_run_whose_adapters_never_move_fails_loudly(finetuned, monkeypatch, capsys):
    """A step that drops its update (a wiring bug) must not end as a silent base-model run."""
    from dptrain.trainer import _loop

    tmp, _ = finetuned
    real = _loop.compiled_step

    def stuck_compiled_step(*args, **kwargs):
        step, optimizer, static = real(*args, **kwargs)

        def stuck(params, opt_state, *rest):
            copy = jax.tree_util.tree_map(jax.numpy.copy, params)  # the step donates it
            _, opt_state, metrics = step(copy, opt_state, *rest)
            return params, opt_state, metrics
        return stuck, optimizer, static

    monkeypatch.setattr(_loop, "compiled_step", stuck_compiled_step)
    raw = yaml.safe_load(SAMPLE.read_text())
    raw["spec"]["data"]["sequenceLength"] = 32
    raw["spec"]["training"].update(batchSize=16, iterations=2, warmupSteps=0)
    raw["spec"]["checkpoint"] = {"intervalSteps": 2, "keep": 1}
    job = tmp / "stuck"
    job.mkdir()
    (job / "tiny-vaultgemma").symlink_to(tmp / "tiny-vaultgemma")
    capsys.readouterr()
    code = main(["run", str(_write(job, raw)), "--output", str(job / "run"), "--no-progress"])
    assert code != 0
    assert "did not change" in capsys.readouterr().err
