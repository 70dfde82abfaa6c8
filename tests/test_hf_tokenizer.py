"""spec.data.tokenizer: huggingface — a checkpoint's tokenizer.json, read with `tokenizers`."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from dptrain.cli._main import main
from dptrain.trainer._tokenizer import HuggingFaceTokenizer, make_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from hf_checkpoints import make_checkpoint
from test_hf_export import _as_dptrain_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = ["the quick brown fox jumps over the lazy dog", "private data stays private",
        "differential privacy bounds what one sequence can change", "hello world"] * 20


def _tokenizer_dir(directory: pathlib.Path) -> int:
    """Train a tiny byte-level BPE offline and save it as transformers does; its vocab size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.save_pretrained(directory)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return directory, _tokenizer_dir(directory)


def test_tokenizer_json_round_trips_and_names_its_special_tokens(tokenizer_dir):
    directory, vocab = tokenizer_dir
    tok = make_tokenizer("huggingface", directory)
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (vocab, 0, 1, 2)
    ids = tok.encode("the lazy fox stays private")
    assert ids == AutoTokenizer.from_pretrained(directory)("the lazy fox stays private",
                                                           add_special_tokens=False).input_ids
    assert tok.decode([tok.bos_id, *ids, tok.pad_id]) == "the lazy fox stays private"
    described = tok.describe()
    assert described["kind"] == "huggingface" and len(described["model_sha256"]) == 64
    with pytest.raises(ValueError, match=r"spec\.data\.tokenizerModel"):
        make_tokenizer("huggingface", directory / "absent.json")


def test_vocabulary_mismatch_with_the_pretrained_model_names_both_sizes(tokenizer_dir,
                                                                         tmp_path, capsys):
    directory, vocab = tokenizer_dir
    make_checkpoint(tmp_path / "base", "vaultgemma")  # 259 tokens, not the tokenizer's
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    job = yaml.safe_load((ROOT / "manifests" / "samples" / "tiny-cpu.yaml").read_text())
    job["spec"]["model"] = {"pretrained": {"path": "base"}}
    job["spec"]["data"] = {"path": "docs.jsonl", "tokenizer": "huggingface",
                           "tokenizerModel": str(directory), "sequenceLength": 16}
    job["spec"]["training"].update(batchSize=4, iterations=2, warmupSteps=0)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert "spec.data.tokenizer" in err and str(vocab) in err and "259" in err


def test_generate_with_text_uses_the_exported_tokenizer(tokenizer_dir, tmp_path, capsys):
    directory, vocab = tokenizer_dir
    base = tmp_path / "base"
    torch_model = make_checkpoint(base, "gemma2", vocab_size=vocab, seed=7)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((directory / name).read_bytes())
    _as_dptrain_checkpoint(base, tmp_path / "ckpt", steps=3)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the quick", "--greedy",
                 "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = [1, *hf_tok("the quick", add_special_tokens=False).input_ids]
    assert result["prompt_ids"] == prompt
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reloaded.generate(torch.tensor([prompt]), max_new_tokens=8,
                                     do_sample=False)[0, len(prompt):].tolist()
    assert result["new_ids"] == expected
    assert isinstance(result["text"], str)
    del torch_model
