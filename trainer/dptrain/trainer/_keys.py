"""The job's secret key, and the per-execution sampling and noise keys derived from it.

DP-SGD's guarantee assumes that the batch selection and the noise are secret random draws. They
are derived here from a secret **job key** of 256 bits drawn from the OS CSPRNG (``secrets``)
and the **execution count**: the ledger's count of steps charged before the step runs. The
model's step index is not used: a step re-run after a restart from an older checkpoint is a new
execution, charged again by the ledger, and gets an independent batch and independent noise.

Where the key lives: in a Kubernetes Secret owned by the job, mounted read-only into trainer pods
(the operator draws it); for ``dptrain run``, in ``job.key`` in the output directory (mode 0600,
created once, reused on resume). Nothing the job publishes holds more than its SHA-256
fingerprint (:func:`key_fingerprint`).

Derivation: HMAC-SHA256 keyed with the job key over a domain label and the execution count (a
pseudo-random function): the sampling stream gets 256 bits of entropy for numpy's Philox
(``SeedSequence``), the noise gets a JAX PRNG key.

Formal guarantees:
    1. Secrecy: the derived keys are outputs of HMAC-SHA256 under the secret job key; without the
       key they are computationally indistinguishable from independent uniform draws, for every
       pair of distinct (domain, execution) inputs.
    2. Freshness: distinct execution counts give independent (pseudo-random) sampling and noise
       keys; the sampling and noise streams of one execution are independent of each other.
    3. Determinism: the same key and execution count always give the same keys, so a run stopped
       gracefully and resumed is bit-identical to an uninterrupted one.
    4. The job key file is created at most once (``O_EXCL``), owner-only (0600); a resume without
       it is refused (:class:`MissingKeyError`), never silently replaced by a new key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets

import numpy as np

KEY_BYTES = 32
"""256-bit job keys."""
LOCAL_KEY_FILE = "job.key"
"""The key file of ``dptrain run`` in the output directory."""
SECRET_KEY_NAME = "key"
"""The data key of the operator's Secret (and the file name where it is mounted)."""

_SAMPLING = b"dptrain/v1/sampling"
_NOISE = b"dptrain/v1/noise"


class MissingKeyError(RuntimeError):
    """A run that has already spent privacy cannot find its secret key."""


def new_key() -> bytes:
    """A fresh 256-bit key from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def key_fingerprint(key: bytes) -> str:
    """``sha256:<hex>`` of the key: safe to publish, identifies the key (to refuse mismatches)."""
    return "sha256:" + hashlib.sha256(key).hexdigest()


def _check(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) < KEY_BYTES:
        raise ValueError(f"the job key must be at least {KEY_BYTES} bytes "
                         f"(got {len(key) if isinstance(key, bytes) else type(key).__name__})")
    return key


def _prf(key: bytes, domain: bytes, execution: int) -> bytes:
    if execution < 0:
        raise ValueError(f"execution count must be ≥ 0 (got {execution})")
    message = domain + b"\x00" + int(execution).to_bytes(16, "big")
    return hmac.new(_check(key), message, hashlib.sha256).digest()


def sampling_entropy(key: bytes, execution: int) -> int:
    """256 bits of entropy (an int) for the batch of execution ``execution``."""
    return int.from_bytes(_prf(key, _SAMPLING, execution), "big")


def noise_key_data(key: bytes, execution: int) -> np.ndarray:
    """Raw JAX PRNG key data (``uint32[2]``, threefry) of the noise of execution ``execution``."""
    digest = _prf(key, _NOISE, execution)
    return np.frombuffer(digest[:8], dtype=">u4").astype(np.uint32)


def read_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file (raw bytes, or hex text as a Secret's value may be written).

    Raises:
        ValueError: the file holds fewer than 256 bits.
    """
    data = pathlib.Path(path).read_bytes()
    text = data.strip()
    try:
        if len(text) >= 2 * KEY_BYTES and all(c in b"0123456789abcdefABCDEF" for c in text):
            data = bytes.fromhex(text.decode())
    except ValueError:
        pass
    return _check(data)


def write_new_key(path: str | os.PathLike[str]) -> bytes:
    """Create ``path`` (0600, exclusively) holding a fresh key; never overwrites."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def local_key(path: str | os.PathLike[str], *, resuming: bool) -> bytes:
    """The key of a local run: read it, or create it for a fresh run.

    Args:
        path: the key file.
        resuming: the run has already spent privacy (a ledger or checkpoint exists).

    Raises:
        MissingKeyError: ``resuming`` and the file is missing.
    """
    path = pathlib.Path(path)
    if path.is_file():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)  # tighten a copy restored with looser permissions
        return read_key(path)
    if resuming:
        raise MissingKeyError(
            f"{path}: the job's secret key is missing, but this run has already spent privacy "
            "(a ledger or checkpoint exists). Restore the key file to resume; a new key would "
            "make the resumed steps' randomness unrelated to what was charged. To start over, "
            "use a fresh output directory.")
    return write_new_key(path)
