"""A usable model out: `dptrain export` (Hugging Face directory + privacy card) and `generate`."""

from __future__ import annotations

import json
import pathlib
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dptrain.cli._main import main
from dptrain.privacy import DpSgdMechanism, PrivacyLedger, epsilon
from dptrain.trainer._checkpoint import Checkpointer, shape_to_dict
from dptrain.trainer._export import ExportError, export_huggingface, load_checkpoint_model
from dptrain.trainer._generate import generate_ids
from dptrain.trainer._hf import load_pretrained, shape_and_arch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from hf_checkpoints import make_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [[1, 72, 101, 108, 108, 111, 44, 32], [1, 5, 9, 200, 7, 7, 7, 31, 44, 12, 90, 3, 250]]
SECRET = b"\x07" * 32  # stands in for the job key: it must never reach the export


def _logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor([tokens])).logits[0].numpy()


def _as_dptrain_checkpoint(pretrained: pathlib.Path, directory: pathlib.Path, *, steps: int):
    """A dptrain checkpoint of the imported weights, with the metadata the loop writes."""
    model, config = load_pretrained(pretrained)
    shape, arch = shape_and_arch(config)
    mechanism = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.1, delta=1e-6,
                               dataset_size=1000, physical_batch_size=40)
    ledger = PrivacyLedger(mechanism=mechanism, epsilon_budget=8.0, steps_charged=steps)
    meta = {"job": "finetune-test", "seed": 0, "key_fingerprint": "ab" * 32,
            "ledger": ledger.to_dict(), "model_shape": shape_to_dict(shape),
            "architecture": arch.to_dict(),
            "pretrained": {"format": "huggingface", "path": str(pretrained)},
            "dataset": {"checksum": "c0ffee" * 8, "num_sequences": 1000, "sequence_length": 32},
            "plan": {"clip_norm": 0.75, "noise_multiplier": 1.1, "batch_size": 10},
            "tokenizer": {"kind": "byte", "vocab_size": 259, "pad_id": 0, "bos_id": 1,
                          "eos_id": 2}}
    checkpointer = Checkpointer(directory)
    params, _ = eqx.partition(model, eqx.is_array)
    checkpointer.save(steps, params, params, meta)
    checkpointer.close()
    return model, mechanism


@pytest.fixture(scope="module", params=["vaultgemma", "gemma2"])
def exported(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    torch_model = make_checkpoint(base / "pretrained", request.param, seed=2)
    (base / "pretrained" / "tokenizer_config.json").write_text("{}")  # copied when present
    model, mechanism = _as_dptrain_checkpoint(base / "pretrained", base / "ckpt", steps=25)
    # A ledger beside the checkpoint that charged more steps than the weights include.
    (base / "ckpt" / "ledger.json").write_text(json.dumps({"steps_charged": 30}))
    out = base / "export"
    assert main(["export", str(base / "ckpt"), "--format", "huggingface", "--output", str(out),
                 "--json"]) == 0
    return request.param, torch_model, model, mechanism, out


def test_round_trip_import_export_loads_in_transformers_with_equal_logits(exported):
    model_type, torch_model, _, _, out = exported
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.model_type == model_type
    for tokens in PROMPTS:
        diff = np.max(np.abs(_logits(reloaded, tokens) - _logits(torch_model, tokens)))
        assert diff < 1e-4  # logits, fp32


def test_model_card_states_the_privacy_guarantee_and_no_secret(exported):
    _, _, _, mechanism, out = exported
    card = (out / "README.md").read_text()
    # ε of the larger count (30 steps from ledger.json, not the checkpoint's 25).
    eps = epsilon(mechanism, 30)
    assert eps > epsilon(mechanism, 25)
    assert f"{eps:.6g}" in card
    for needle in ("1e-06", "sequence", "q = 0.01", "σ | 1.1", "Steps charged | 30", "pld",
                   "Clip norm C | 0.75", "c0ffee" * 8):
        assert needle in card, needle
    exported_bytes = b"".join(p.read_bytes() for p in out.iterdir())
    assert SECRET.hex().encode() not in exported_bytes


def test_export_refuses_a_non_empty_output_and_a_missing_checkpoint(exported, tmp_path, capsys):
    _, _, _, _, out = exported
    with pytest.raises(ExportError, match="not an empty directory"):
        export_huggingface(out.parent / "ckpt", out)
    assert main(["export", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]) == 3
    assert "no such directory" in capsys.readouterr().err


def test_greedy_generate_equals_transformers_token_for_token(exported, capsys):
    _, torch_model, model, _, out = exported
    torch_model.generation_config.eos_token_id = None  # compare full length
    for tokens in PROMPTS:
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([tokens]), max_new_tokens=12,
                                            do_sample=False)[0, len(tokens):].tolist()
        got, stopped = generate_ids(model, tokens, max_new_tokens=12, greedy=True)
        assert got == expected and stopped == "length"
    # The CLI on the export: the same tokens (it stops after eos, id 2, if met).
    assert main(["generate", str(out), "--prompt-ids", ",".join(map(str, PROMPTS[0])),
                 "--max-new-tokens", "12", "--greedy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    first = generate_ids(model, PROMPTS[0], max_new_tokens=12, greedy=True, eos_id=2)[0]
    assert result["new_ids"] == first


def test_sampling_respects_top_k_and_is_reproducible(exported):
    _, _, model, _, _ = exported
    prompt = PROMPTS[1]
    logits = np.asarray(model(jax.numpy.asarray(prompt)))[-1]
    one, _ = generate_ids(model, prompt, max_new_tokens=6, greedy=False, top_k=1, seed=3)
    assert one[0] == int(np.argmax(logits))  # top-1 sampling is greedy
    a = generate_ids(model, prompt, max_new_tokens=6, greedy=False, temperature=1.5, seed=4)
    b = generate_ids(model, prompt, max_new_tokens=6, greedy=False, temperature=1.5, seed=4)
    assert a == b


def test_checkpoint_model_loads_back(exported):
    _, _, model, _, out = exported
    restored, meta = load_checkpoint_model(out.parent / "ckpt")
    assert meta["step"] == 25
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(model),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_dptrain_run_fine_tunes_a_pretrained_checkpoint_then_exports(tmp_path, capsys):
    """`dptrain run` with spec.model.pretrained: the planner keeps the model; export loads."""
    torch_model = make_checkpoint(tmp_path / "base", "gemma2", seed=5)
    job = yaml.safe_load((ROOT / "manifests" / "samples" / "tiny-cpu.yaml").read_text())
    job["metadata"]["name"] = "finetune"
    job["spec"]["model"] = {"pretrained": {"format": "huggingface", "path": "base"}}
    job["spec"]["data"]["sequenceLength"] = 32
    job["spec"]["training"].update(batchSize=8, iterations=3, warmupSteps=0)
    job["spec"]["checkpoint"] = {"intervalSteps": 3, "keep": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "job.yaml"), "--output", str(run), "--json",
                 "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 3
    # Step 0's loss is the pretrained model's: the DP loss estimate is noisy, so check the
    # weights instead: they start from the checkpoint and moved.
    trained, meta = load_checkpoint_model(run / "checkpoints")
    assert meta["pretrained"]["path"].endswith("base")
    original, _ = load_pretrained(tmp_path / "base")
    moved = sum(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(original), strict=True))
    assert 0 < moved < 10
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", str(run / "checkpoints"), "--output", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for tokens in PROMPTS:
        ours = np.asarray(trained(jax.numpy.asarray(tokens)))
        assert np.max(np.abs(_logits(reloaded, tokens) - ours)) < 1e-4
        assert np.max(np.abs(_logits(reloaded, tokens) - _logits(torch_model, tokens))) > 1e-4


def test_plan_keeps_a_pretrained_model_fixed_and_says_so(tmp_path, capsys):
    make_checkpoint(tmp_path / "base", "vaultgemma", seed=6)
    job = yaml.safe_load((ROOT / "manifests" / "samples" / "tiny-cpu.yaml").read_text())
    job["spec"]["model"] = {"pretrained": {"path": "base"}}
    job["spec"]["data"]["numSequences"] = 20000
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["plan", str(tmp_path / "job.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    _, config = load_pretrained(tmp_path / "base")
    shape, _ = shape_and_arch(config)
    assert plan["model_preset"] == "hf-vaultgemma"
    assert plan["model_params"] == shape.param_count
    assert plan["model_fixed_by"].startswith("spec.model.pretrained")
    assert main(["plan", str(tmp_path / "job.yaml")]) == 0
    assert "model fixed by spec.model.pretrained" in capsys.readouterr().out
    # A preset and a checkpoint at once is a validation error naming the field.
    job["spec"]["model"]["preset"] = "tiny"
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(job))
    assert main(["plan", str(tmp_path / "both.yaml")]) == 3
    assert "spec.model.pretrained" in capsys.readouterr().err
