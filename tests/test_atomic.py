"""One atomic writer: outputs whole or not at all, leftovers of a crashed run cleared."""
import pytest

from covseg.atomic import atomic_output, staging_path, write_json


def test_file_replaced_only_when_complete(tmp_path):
    target = tmp_path / "out.json"
    write_json({"a": 1}, target)
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n "a": 1\n}\n'
    assert not staging_path(target).exists()


def test_folder_replaced_whole(tmp_path):
    target = tmp_path / "folder"
    with atomic_output(target, directory=True) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_output(target, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_stale_staging_of_a_crashed_run_is_cleared(tmp_path):
    target = tmp_path / "evaluation"
    stale = staging_path(target)
    stale.mkdir()
    (stale / "from_a_crashed_run.png").write_text("stale")
    with atomic_output(target, directory=True) as tmp:
        (tmp / "fresh.png").write_text("fresh")
    assert [p.name for p in target.iterdir()] == ["fresh.png"]


def test_staging_keeps_the_suffix(tmp_path):
    assert staging_path(tmp_path / "masks.npy").suffix == ".npy"
