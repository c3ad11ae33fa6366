"""Checkpoints never lose data silently: what cannot be read back is refused when saving, a
failed save leaves nothing behind, and any damage to a file is one ValueError on loading."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
import resource
import signal
import zipfile
from typing import NamedTuple

import numpy as np
import pytest
import torch

import funcopt as fo
import funcopt.checkpoint as ck


def _tree():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    tx = fo.adam(1e-3)
    return params, tx.init(params), tx


@dataclasses.dataclass
class _Config:
    lr: float = 0.1
    layers: tuple = (3, 4)


class _Pair(NamedTuple):
    a: int
    b: int


# ----------------------------------------------------------------------------- save time


@pytest.mark.parametrize("extra, where, fix", [
    ({"config": _Config()}, "extra['config']", "dataclasses.asdict"),
    ({"run": {"pair": _Pair(1, 2)}}, "extra['run']['pair']", "_asdict()"),
    ({"lrs": [0.1, np.float64(0.2)]}, "extra['lrs'][1]", ".item()"),
    ({"x": np.zeros(3)}, "extra['x']", "torch.from_numpy"),
    ({"f": frozenset([1])}, "extra['f']", "lists and dicts"),
    ({"sparse": torch.eye(2).to_sparse()}, "extra['sparse']", "to_dense"),
])
def test_extra_that_a_weights_only_load_refuses_is_refused_at_save(tmp_path, extra, where, fix):
    params, state, _ = _tree()
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError) as e:
        ck.save_checkpoint(path, params, state, extra=extra)
    assert where in str(e.value) and fix in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # the refusal is right: torch itself cannot read such a file back with weights_only=True
    # (sparse tensors load, but their bytes cannot be checksummed, so they are refused too)
    if "sparse" not in extra:
        torch.save(extra, tmp_path / "raw.pt")
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(tmp_path / "raw.pt", weights_only=True)


def test_every_kind_of_extra_it_accepts_loads_back_equal(tmp_path):
    params, state, tx = _tree()
    extra = {
        "none": None, "flag": True, "n": -(2**70), "x": float("inf"), "z": 1 - 2j, "s": "é",
        "raw": b"\x00\xff", "t": torch.arange(6.0).reshape(2, 3).t(), "dtype": torch.bfloat16,
        "device": torch.device("cpu"), "size": torch.Size([2, 3]), "set": {3, "a"},
        "od": collections.OrderedDict(b=1, a=2), 7: [(1, 2), [3]],
    }
    ck.save_checkpoint(tmp_path / "c.pt", params, state, extra=extra)
    got = ck.load_checkpoint(tmp_path / "c.pt", params, tx.init(params)).extra
    assert torch.equal(got.pop("t"), extra.pop("t"))
    assert got == extra and list(got["od"]) == ["b", "a"]


def _fill_disk_after(limit: int):
    """Let this process write files up to ``limit`` bytes, as if the disk then filled up."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))

    def restore():
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)

    return restore


def test_a_save_that_fails_part_way_leaves_the_old_file_and_no_tmp(tmp_path):
    params, state, tx = _tree()
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, params, state, step=1)
    before = path.read_bytes()
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB: past the limit below
    restore = _fill_disk_after(1 << 16)
    try:
        with pytest.raises((OSError, RuntimeError)):
            ck.save_checkpoint(path, big, fo.adam(1e-3).init(big), step=2)
    finally:
        restore()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path, params, tx.init(params)).step == 1


# ----------------------------------------------------------------------------- load time


@pytest.fixture
def saved(tmp_path):
    params, state, tx = _tree()
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, params, state, step=5, extra={"note": "x"}, rng=False)
    return path, params, tx


def _load(path, params, tx):
    return ck.load_checkpoint(path, params, tx.init(params), restore_rng=False)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b"", "empty"),
    (lambda b: bytes(random.Random(0).randrange(256) for _ in range(len(b))), "truncated"),
])
def test_truncated_empty_or_garbage_files_are_one_clear_error(saved, damage, message):
    path, params, tx = saved
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as e:
        _load(path, params, tx)
    assert str(path) in str(e.value) and "weights_only` set to `False" not in str(e.value)


def test_a_changed_tensor_fails_the_checksum(saved):
    path, params, tx = saved
    payload = torch.load(path, weights_only=True)
    payload["params"]["leaves"][0].view(-1)[0] += 1.0  # a valid torch file with different content
    torch.save(payload, path)
    with pytest.raises(ValueError, match="SHA-256"):
        _load(path, params, tx)


def test_the_checksum_is_sha256_of_the_content(saved):
    path, *_ = saved
    payload = torch.load(path, weights_only=True)
    want = payload.pop("sha256")
    assert payload["format"] == 2 and want == ck.payload_digest(payload)
    # independent reference: the digest of one tensor is SHA-256 over its tag and raw bytes
    t = torch.arange(3, dtype=torch.float64)
    ref = hashlib.sha256(b"Ttorch.float64(3,):" + np.arange(3, dtype=np.float64).tobytes())
    assert ck.payload_digest(t) == ref.hexdigest()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_any_single_byte_flip_is_an_error_or_changes_nothing(saved):
    """Flip bytes all over the file (zip headers, the pickle, tensor data): each load either
    raises one ValueError or returns exactly the saved numbers (bytes torch never reads)."""
    path, params, tx = saved
    good = path.read_bytes()
    want = _load(path, params, tx)
    errors = 0
    for i in range(0, len(good), max(1, len(good) // 300)):
        bad = bytearray(good)
        bad[i] ^= 0x10
        path.write_bytes(bytes(bad))
        try:
            got = _load(path, params, tx)
        except ValueError as e:
            assert str(path) in str(e)
            errors += 1
            continue
        assert got.step == want.step and got.extra == want.extra
        for a, b in zip(fo.tree_leaves((got.params, got.opt_state)),
                        fo.tree_leaves((want.params, want.opt_state))):
            assert torch.equal(a, b)
    assert errors > 0


def test_flipping_a_byte_of_tensor_data_is_caught(saved):
    path, params, tx = saved
    data = bytearray(path.read_bytes())
    raw = params["w"].numpy().tobytes()
    i = bytes(data).index(raw)
    data[i + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256|damaged"):
        _load(path, params, tx)


def test_a_pickle_of_other_objects_is_refused_without_advice_to_unpickle(tmp_path):
    params, _, tx = _tree()
    torch.save({"format": 2, "config": _Config()}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="_Config") as e:
        _load(tmp_path / "c.pt", params, tx)
    assert "weights_only` set to `False" not in str(e.value)


@pytest.mark.parametrize("payload, message", [
    ({"a": 1}, "not a funcopt checkpoint"),
    ([1, 2], "not a funcopt checkpoint"),
    ({"format": 99}, "newer funcopt"),
    ({"format": "x"}, "unknown checkpoint format"),
    ({"format": 2, "params": {}}, "missing"),
])
def test_other_torch_files_are_named_for_what_they_are(tmp_path, payload, message):
    params, _, tx = _tree()
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=message):
        _load(tmp_path / "c.pt", params, tx)


def test_a_file_without_its_checksum_is_refused(saved):
    path, params, tx = saved
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="no 'sha256'"):
        _load(path, params, tx)


def test_files_of_the_first_format_still_load(tmp_path):
    """Format 1 (no checksum) as the first release wrote it."""
    params, state, tx = _tree()
    torch.save({"format": 1, "params": ck.tree_to_state_dict(params),
                "opt_state": ck.tree_to_state_dict(state), "step": 4, "extra": {"k": 1}},
               tmp_path / "old.pt")
    got = _load(tmp_path / "old.pt", params, tx)
    assert got.step == 4 and got.extra == {"k": 1}
    assert all(torch.equal(got.params[k], params[k]) for k in params)


def test_the_file_is_still_a_plain_weights_only_zip(saved):
    path, *_ = saved
    assert zipfile.is_zipfile(path)
    assert set(torch.load(path, weights_only=True)) == {
        "format", "params", "opt_state", "step", "extra", "sha256"}
