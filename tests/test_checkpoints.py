"""Checkpoint corruption (issue 14): a real saved LeNet-5 checkpoint truncated at every 1/16 of
its length, with flipped bytes, wrong, missing or extra members, wrong dtypes and shapes, and
files that are not checkpoints at all. Each is refused with a ``ValueError`` naming the file,
and the network is left exactly as it was. A flipped byte may also land in zip metadata that
carries no data (a timestamp); the load may then succeed, but only with the saved values.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile

import numpy as np
import pytest

from sparseconv.models import lenet5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.npz"
    net = lenet5(seed=0)
    net.save(path)
    return path, path.read_bytes(), net.state_dict()


def _target():
    net = lenet5(seed=1, build=False)
    return net, net.state_dict()


def _assert_unchanged(net, before):
    after = net.state_dict()
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def _assert_refused(path, match=""):
    net, before = _target()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match):
        net.load(path)
    _assert_unchanged(net, before)


@pytest.mark.parametrize("sixteenths", range(16), ids=[f"{k}of16" for k in range(16)])
def test_truncated_checkpoint_is_refused(saved, tmp_path, sixteenths):
    _, raw, _ = saved
    path = tmp_path / "truncated.npz"
    path.write_bytes(raw[:len(raw) * sixteenths // 16])
    _assert_refused(path)


def _data_regions(raw_path):
    """Byte ranges of every member's array data inside the archive."""
    regions = []
    with zipfile.ZipFile(raw_path) as zf, open(raw_path, "rb") as fh:
        for info in zf.infolist():
            fh.seek(info.header_offset)
            local = fh.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[version]
                read_header(member)
                header = member.tell()
            regions.append((start + header, start + info.file_size))
    return regions


def test_flipped_bytes_in_array_data_are_refused(saved, tmp_path):
    path, raw, _ = saved
    regions = _data_regions(path)
    assert len(regions) == len(lenet5().state_dict())
    rng = np.random.default_rng(0)
    positions = [int(rng.integers(lo, hi)) for lo, hi in regions]
    for pos in positions:
        corrupted = bytearray(raw)
        corrupted[pos] ^= 0x5A
        target = tmp_path / "flipped.npz"
        target.write_bytes(bytes(corrupted))
        _assert_refused(target)


def test_flipped_bytes_anywhere_never_load_wrong_values(saved, tmp_path):
    _, raw, reference = saved
    loaded = refused = 0
    for pos in np.linspace(0, len(raw) - 1, 120).astype(int):
        corrupted = bytearray(raw)
        corrupted[pos] ^= 0xFF
        target = tmp_path / "flipped.npz"
        target.write_bytes(bytes(corrupted))
        net, before = _target()
        try:
            net.load(target)
        except ValueError as err:
            assert str(target) in str(err)
            _assert_unchanged(net, before)
            refused += 1
        else:
            _assert_unchanged(net, reference)
            loaded += 1
    assert refused > 100, (loaded, refused)


def _write(path, state):
    np.savez(path, **state)
    return path


def test_missing_member_is_refused(saved, tmp_path):
    _, _, state = saved
    partial = state_copy(state)
    partial.pop("13.bias")
    _assert_refused(_write(tmp_path / "missing.npz", partial), r"missing parameters \['13\.bias'\]")


def state_copy(state):
    return {k: v.copy() for k, v in state.items()}


def test_extra_member_is_refused(saved, tmp_path):
    _, _, state = saved
    extra = state_copy(state)
    extra["14.weight"] = np.zeros(3, dtype=np.float32)
    _assert_refused(_write(tmp_path / "extra.npz", extra), r"unexpected parameters \['14\.weight'\]")


def test_renamed_member_is_refused(saved, tmp_path):
    _, _, state = saved
    renamed = state_copy(state)
    renamed["conv.weight"] = renamed.pop("0.weight")
    _assert_refused(_write(tmp_path / "renamed.npz", renamed), "missing parameters")


@pytest.mark.parametrize("name,value,match", [
    ("string", np.array(["a"] * 84), "dtype <U1"),
    ("int", np.zeros(84, dtype=np.int64), "dtype int64"),
    ("bool", np.zeros(84, dtype=bool), "dtype bool"),
    ("complex", np.zeros(84, dtype=np.complex128), "dtype complex128"),
    ("nan", np.full(84, np.nan), "NaN or infinite"),
    ("overflow-float32", np.full(84, 1e300), "beyond the range of float32"),
    ("shape", np.zeros(85, dtype=np.float32), r"shape \(84,\) in the network but \(85,\)"),
    ("scalar", np.float32(0.0), r"shape \(84,\) in the network but \(\)"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_last_member_leaves_every_parameter_unchanged(saved, tmp_path, name, value, match):
    # "11.bias" sorts late: the earlier parameters would be written first by a naive loader
    _, _, state = saved
    bad = state_copy(state)
    bad["11.bias"] = np.asarray(value)
    _assert_refused(_write(tmp_path / f"{name}.npz", bad), match)


def test_object_member_is_refused_without_unpickling(saved, tmp_path):
    _, _, state = saved
    bad = state_copy(state)
    bad["11.bias"] = np.array([object()] * 84, dtype=object)
    np.savez(tmp_path / "object.npz", **bad)
    _assert_refused(tmp_path / "object.npz", "allow_pickle")


def test_non_member_file_in_the_archive_is_refused(saved, tmp_path):
    path, raw, _ = saved
    target = tmp_path / "junk.npz"
    target.write_bytes(raw)
    with zipfile.ZipFile(target, "a") as zf:
        zf.writestr("notes.txt", "not an array")
    _assert_refused(target)


def test_float64_checkpoint_loads_into_float32_network(tmp_path):
    source = lenet5(dtype=np.float64, seed=0)
    source.save(tmp_path / "f64.npz")
    target = lenet5(seed=1)
    target.load(tmp_path / "f64.npz")
    for name, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[name], value.astype(np.float32))


@pytest.mark.parametrize("kind", ["npy", "empty", "text", "png", "pickle", "directory"])
def test_files_that_are_not_checkpoints_are_refused_naming_the_path(tmp_path, kind):
    path = tmp_path / f"x.{kind}"
    if kind == "npy":
        path = tmp_path / "x.npy"
        np.save(path, np.zeros(3))
        match = r"single array \(\.npy\)"
    elif kind == "empty":
        path.write_bytes(b"")
        match = "not a checkpoint: it is an empty file"
    elif kind == "text":
        path.write_text("weights = [1, 2, 3]\n")
        match = "not a checkpoint: it is a file starting with b'weight'"
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        match = "not a checkpoint: it is a file starting with b'\\\\x89PNG"
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"0.weight": [1, 2]}))
        match = "not a checkpoint: it is a file starting with"
    else:
        path.mkdir()
        match = "is a directory"
    _assert_refused(path, match)


def test_missing_file_is_file_not_found(tmp_path):
    net, before = _target()
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        net.load(tmp_path / "nothing.npz")
    _assert_unchanged(net, before)


@pytest.mark.parametrize("where", ["missing-dir", "directory", "permission-denied"])
def test_save_to_an_unwritable_path_names_the_path(tmp_path, monkeypatch, where):
    import tempfile
    path = tmp_path / "ckpt.npz"
    if where == "missing-dir":
        path = tmp_path / "no" / "such" / "ckpt.npz"
    elif where == "directory":
        path = tmp_path
    else:
        # what mkstemp raises in a directory the user cannot write to (root can write anywhere)
        def denied(dir, prefix, suffix):
            raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc{suffix}")
        monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OSError, match=re.escape(str(path))) as info:
        lenet5(build=False).save(path)
    assert ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
