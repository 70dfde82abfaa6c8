"""Shared pytest fixtures (each area appends its own section)."""

# --- operator test fixtures (owned by the operator work; see tests/kube/) -----------------------
import os as _os
import sys as _sys
from pathlib import Path as _Path

import pytest as _pytest

_sys.path.insert(0, str(_Path(__file__).parent / "kube"))


@_pytest.fixture(scope="session")
def planner_cache_dir(tmp_path_factory: _pytest.TempPathFactory) -> _Path:
    """One planner cache (σ tables) for the whole session, shared with operator processes."""
    configured = _os.environ.get("DPTRAIN_TEST_CACHE_DIR")
    return _Path(configured) if configured else tmp_path_factory.mktemp("planner-cache")


@_pytest.fixture()
def kube_api():
    """A fresh Kubernetes API emulator (kmock + fixes) on a random port; stopped afterwards."""
    from kube_server import EmulatorServer

    server = EmulatorServer().start()
    try:
        yield server
    finally:
        server.stop()


@_pytest.fixture()
def kube(kube_api):
    """A JSON-over-HTTP client of the emulator (what kubectl would send)."""
    from kube_client import KubeHTTP

    return KubeHTTP(kube_api.url)


@_pytest.fixture()
def start_operator(kube_api, tmp_path: _Path, planner_cache_dir: _Path):
    """Start the real operator (`dptrain operator -A`) against the emulator; always stopped."""
    from kube_operator import OperatorProcess

    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    started: list[OperatorProcess] = []

    def start(*extra_args: str, env: dict[str, str] | None = None) -> OperatorProcess:
        process = OperatorProcess(
            kubeconfig, tmp_path / f"operator-{len(started)}.log",
            extra_args=("--cache-dir", str(planner_cache_dir), *extra_args), env=env)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()


# --- trainer test fixtures (owned by the trainer work) -------------------------------------------
# JAX is imported inside the fixtures so that collecting other areas' tests stays fast.

MICRO_SEQUENCE_LENGTH = 16
# The trainer tests compile many tiny programs: skipping LLVM's optimisations halves compile time,
# and tiny programs run fast either way. (Only JAX reads XLA_FLAGS; an explicit setting wins.)
_os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# One persistent XLA compilation cache for the session's workers and every trainer subprocess
# they start: the same tiny programs are compiled by dozens of tests. A size limit turns on
# JAX's file lock, so two workers never read a half-written entry. Entries are keyed by the
# program, the XLA flags and the JAX version; nothing about training data is in them.
_os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(_Path(__import__("tempfile").gettempdir()) / f"dptrain-tests-jax-cache-{_os.getuid()}"))
_os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
_os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))


@_pytest.fixture(scope="session")
def micro_shape():
    """A one-layer decoder small enough to compile in seconds (all trainer tests share it)."""
    from dptrain.planner import BYTE_VOCAB_SIZE, ModelShape

    return ModelShape(name="micro", vocab_size=BYTE_VOCAB_SIZE, d_model=16, n_layers=1,
                      n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                      max_seq_len=MICRO_SEQUENCE_LENGTH)


@_pytest.fixture(scope="session")
def micro_dataset(tmp_path_factory: _pytest.TempPathFactory):
    """~300 sequences of 16 byte tokens from a small, repetitive JSONL corpus."""
    import json

    from dptrain.trainer import ByteTokenizer, prepare_dataset, source_from_spec

    root = tmp_path_factory.mktemp("micro-data")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = [json.dumps({"text": " ".join(words[(i + j) % 8] for j in range(6))})
             for i in range(120)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    source = source_from_spec(path=str(root / "docs.jsonl"), builtin=None, fmt="jsonl",
                              text_field="text")
    return prepare_dataset(source, ByteTokenizer(), sequence_length=MICRO_SEQUENCE_LENGTH,
                           out_dir=root / "prepared", progress=False)


@_pytest.fixture()
def micro_config(micro_shape, micro_dataset, tmp_path: _Path):
    """Factory of TrainConfigs for the micro model; every test uses the same compiled step
    unless it overrides a compile-time field (optimizer settings, clip norm, batch size)."""
    from dptrain.trainer import TrainConfig

    def make(**overrides):
        values = dict(
            job_name="micro", shape=micro_shape, data_dir=micro_dataset.directory,
            dataset_size=micro_dataset.num_sequences, sequence_length=MICRO_SEQUENCE_LENGTH,
            batch_size=8, physical_batch_size=32, iterations=12, noise_multiplier=1.0,
            clip_norm=1.0, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0,
            optimizer="adamw", microbatch_size=None, seed=0, epsilon_budget=50.0, delta=1e-5,
            accountant="rdp", checkpoint_dir=tmp_path / "ckpt", checkpoint_interval=4,
            checkpoint_keep=5, output_dir=tmp_path / "out", progress=False)
        values.update(overrides)
        return TrainConfig.pinned(**values)

    return make


# --- object-storage fixtures (spec.data.uri / spec.checkpoint.uri) -------------------------------

S3_TEST_BUCKET = "dptrain-test"


@_pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto in server mode, the real wire protocol) with one bucket.

    Yields ``(client, env)``: a boto3 client and the environment a pod would get from its
    ``secretRef`` (endpoint and a key pair). moto is a test dependency: never skipped.
    """
    import boto3
    import s3fs  # noqa: F401 - what the trainer uses
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "AKIADPTRAINTEST",
           "AWS_SECRET_ACCESS_KEY": "dptrain-test-secret-5f0c2a", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          region_name="us-east-1")
    client.create_bucket(Bucket=S3_TEST_BUCKET)
    try:
        yield client, env
    finally:
        server.stop()
