"""A training directory packed for a repository and unpacked: the same bytes, no file over the limit."""

from pathlib import Path

import pytest

from model_store.carry import MANIFEST, pack, unpack


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _training_dir(root: Path) -> Path:
    (root / "checkpoint").mkdir(parents=True)
    (root / "candidates" / "step-000004").mkdir(parents=True)
    (root / "train_config.json").write_text('{"name": "x"}')
    (root / "checkpoint" / "trainer_state.pt").write_bytes(bytes(range(256)) * 40 + b"tail")  # 10,244 bytes
    (root / "checkpoint" / "adapter_model.safetensors").write_bytes(b"w" * 3000)  # exactly 3 parts of 1000
    (root / "candidates" / "step-000004" / "adapter_config.json").write_text("{}")
    (root / "empty.txt").write_bytes(b"")
    return root


def test_pack_cuts_large_files_into_parts_and_unpack_restores_every_byte(tmp_path: Path) -> None:
    src = _training_dir(tmp_path / "training")
    files = pack(src, tmp_path / "carried", max_file_bytes=1000)
    packed = _tree(tmp_path / "carried")
    assert all(len(b) <= 1000 for name, b in packed.items() if name != MANIFEST)
    assert files["checkpoint/trainer_state.pt"]["parts"] == 11
    assert files["checkpoint/adapter_model.safetensors"]["parts"] == 3
    assert "checkpoint/adapter_model.safetensors.part003" not in packed
    assert files["train_config.json"]["parts"] == 0 and "train_config.json" in packed

    unpack(tmp_path / "carried", tmp_path / "restored")
    assert _tree(tmp_path / "restored") == _tree(src)


def test_unpack_refuses_a_missing_or_altered_part_and_an_existing_run(tmp_path: Path) -> None:
    src = _training_dir(tmp_path / "training")
    carried = tmp_path / "carried"
    pack(src, carried, max_file_bytes=1000)
    with pytest.raises(FileExistsError):
        unpack(carried, src)  # a run in progress is never overwritten

    part = carried / "checkpoint" / "trainer_state.pt.part004"
    original = part.read_bytes()
    part.write_bytes(original[:-1] + b"\x00")
    with pytest.raises(ValueError, match="differ"):
        unpack(carried, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()

    part.unlink()
    with pytest.raises(ValueError, match="missing"):
        unpack(carried, tmp_path / "restored")
    with pytest.raises(ValueError, match="already holds"):
        pack(carried, tmp_path / "again")
