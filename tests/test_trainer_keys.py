"""The job key and the per-execution keys derived from it (dptrain.trainer._keys guarantees)."""

import hashlib
import os
import stat

import numpy as np
import pytest

from dptrain.trainer._keys import (
    MissingKeyError,
    key_fingerprint,
    local_key,
    noise_key_data,
    read_key,
    sampling_entropy,
    write_new_key,
)

KEY = bytes(range(32))


def test_derived_keys_are_deterministic_fresh_per_execution_and_domain_separated():
    assert np.array_equal(noise_key_data(KEY, 5), noise_key_data(KEY, 5))
    assert sampling_entropy(KEY, 5) == sampling_entropy(KEY, 5)
    noise = {tuple(noise_key_data(KEY, e)) for e in range(1000)}
    sampling = {sampling_entropy(KEY, e) for e in range(1000)}
    assert len(noise) == len(sampling) == 1000  # every execution its own draw
    assert sampling_entropy(KEY, 0).bit_length() > 200  # 256-bit entropy for the sampler
    # Another key gives unrelated streams; the noise is not the sampling stream's prefix.
    assert not np.array_equal(noise_key_data(KEY, 0), noise_key_data(os.urandom(32), 0))
    assert int.from_bytes(noise_key_data(KEY, 0).astype(">u4").tobytes(), "big") != \
        sampling_entropy(KEY, 0) >> 192
    assert noise_key_data(KEY, 0).dtype == np.uint32 and noise_key_data(KEY, 0).shape == (2,)


def test_short_keys_and_negative_executions_are_refused():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        noise_key_data(bytes(16), 0)
    with pytest.raises(ValueError, match="execution"):
        sampling_entropy(KEY, -1)


def test_fingerprint_is_the_sha256_of_the_key_and_not_the_key():
    assert key_fingerprint(KEY) == "sha256:" + hashlib.sha256(KEY).hexdigest()
    assert KEY.hex() not in key_fingerprint(KEY)


def test_the_key_file_is_created_once_owner_only_and_never_overwritten(tmp_path):
    path = tmp_path / "run" / "job.key"
    key = local_key(path, resuming=False)
    assert len(key) == 32 and read_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_key(path, resuming=True) == key  # reused
    with pytest.raises(FileExistsError):
        write_new_key(path)
    assert read_key(path) == key


def test_a_resume_without_the_key_is_refused(tmp_path):
    with pytest.raises(MissingKeyError, match="missing"):
        local_key(tmp_path / "job.key", resuming=True)
    assert not (tmp_path / "job.key").exists()


def test_a_secret_mount_of_raw_bytes_is_read_as_is(tmp_path):
    (tmp_path / "key").write_bytes(KEY)
    assert read_key(tmp_path / "key") == KEY
    (tmp_path / "short").write_bytes(KEY[:16])
    with pytest.raises(ValueError, match="at least 32 bytes"):
        read_key(tmp_path / "short")
