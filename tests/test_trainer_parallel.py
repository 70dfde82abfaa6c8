"""Data parallelism: the step does not depend on how many devices or processes compute it."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = r'''
import json, sys
import numpy as np
mode, out = sys.argv[1], sys.argv[2]
import jax
if mode == "distributed":
    from dptrain.trainer import initialize_from_env
    info = initialize_from_env()
import equinox as eqx, optax
from dptrain.planner import ModelShape
from dptrain.trainer import DpSgdConfig, build_model, make_dp_step, make_mesh, model_loss_fn
from dptrain.trainer._mesh import replicate, shard_batch, to_host

shape = ModelShape(name="micro", vocab_size=259, d_model=16, n_layers=1, n_heads=2,
                   n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=16)
params, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
rng = np.random.default_rng(0)
tokens = rng.integers(3, 259, size=(8, 16)).astype(np.int32)
mask = np.array([True] * 6 + [False] * 2)
root = np.asarray(jax.random.key_data(jax.random.key(5)))
optimizer = optax.sgd(0.1)

def two_steps(mesh):
    step = make_dp_step(model_loss_fn(static), optimizer,
                        DpSgdConfig(clip_norm=0.5, expected_batch_size=6.0), mesh)
    p, s = replicate(mesh, params), replicate(mesh, optimizer.init(params))
    t, m = shard_batch(mesh, tokens, mask)
    for i in range(2):
        p, s, metrics = step(p, s, t, m, root, np.int32(i), np.float32(1.0))
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(to_host(p))])
    return flat.tolist(), float(to_host(metrics).loss)

if mode == "local":
    results = {n: two_steps(make_mesh(jax.devices()[:n])) for n in (1, 2)}
else:
    results = {"global": two_steps(make_mesh())}
results["devices"] = jax.device_count()
with open(out, "w") as f:
    json.dump(results, f)
'''


def _env(**extra):
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.update(extra)
    return env


def _run(tmp_path, mode, name, env, timeout=240):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{name}.json"
    proc = subprocess.Popen([sys.executable, str(script), mode, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _finish(proc, out, timeout=240):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"subprocess timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return json.loads(out.read_text())


# Two SGD steps of parameters of magnitude ≲ 1 in float32: reassociating the sum over devices
# moves them by a few ulps.
ATOL = 2e-6


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    """One subprocess with two CPU devices computes the step on a 1- and a 2-device mesh."""
    tmp_path = tmp_path_factory.mktemp("parallel")
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    proc, out = _run(tmp_path, "local", "local", _env(XLA_FLAGS=flags))
    return _finish(proc, out)


def test_two_local_devices_give_the_same_step_as_one(local_result):
    assert local_result["devices"] == 2
    one, two = np.array(local_result["1"][0]), np.array(local_result["2"][0])
    # Noise drawn per device (and summed) would differ by O(σC/B) ≈ 0.08 per coordinate.
    np.testing.assert_allclose(two, one, rtol=0, atol=ATOL)
    assert local_result["1"][1] == pytest.approx(local_result["2"][1], rel=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_step_as_one(tmp_path, local_result):
    port = _free_port()
    workers = [
        _run(tmp_path, "distributed", f"worker{i}",
             _env(XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
                  JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID=str(i)))
        for i in range(2)]
    reference = np.array(local_result["1"][0])  # one process, one device
    for proc, out in workers:
        result = _finish(proc, out)
        assert result["devices"] == 2  # one CPU device in each of two processes
        np.testing.assert_allclose(np.array(result["global"][0]), reference, rtol=0, atol=ATOL)
