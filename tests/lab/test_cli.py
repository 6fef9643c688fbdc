"""The command line: user data is checked before any run starts, with a message that says what to do."""

from __future__ import annotations

import importlib.util

import pytest

from normkit.cli import main


def test_user_data_needs_files_or_torchvision(tmp_path, capsys):
    code = main(["lab", "--tiny", "--data", "cifar10", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2
    said = capsys.readouterr().out
    if importlib.util.find_spec("torchvision") is None:
        assert "needs torchvision" in said
    else:
        assert "not a directory" in said
    assert not (tmp_path / "out" / "runs").exists()


def test_only_rejects_unknown_studies(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lab", "--only", "no_such_study"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
