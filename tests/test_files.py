import json

import pytest

from effir.files import atomic_path, package_file, write_json, write_text
from effir.utils import EffirError


def test_write_text_and_json_replace_atomically(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_atomic_folder_replaces_old_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the block succeeds
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("folder", [False, True])
def test_failed_write_leaves_the_old_result_and_no_temporary(tmp_path, folder):
    out = tmp_path / "result"
    out.write_text("complete")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        if folder:
            tmp.mkdir()
            (tmp / "part").write_text("half")
        else:
            tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_package_file_names_the_install_command(tmp_path):
    assert package_file("effir", "files.py", "pip install effir").name == "files.py"
    with pytest.raises(EffirError, match="pip install nothing"):
        package_file("effir_no_such_package", "x", "pip install nothing")
    with pytest.raises(EffirError, match="missing from package 'effir'"):
        package_file("effir", "no/such/file", "pip install effir")
