"""The command line: user data is checked before any run starts, with a message that says what to do."""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest

from normkit.cli import main
from normkit.lab import cli as lab_cli


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


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normkit lab")
    lab_cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("option,value", [("--jobs", "0"), ("--jobs", "-2"), ("--jobs", "x")])
def test_counts_below_one_are_usage_errors(option, value, capsys):
    """0 is not "the default": it is refused while parsing, before any run."""
    with pytest.raises(SystemExit) as exit_:
        _parse(option, value)
    assert exit_.value.code == 2
    assert f"error: argument {option}: expected a positive integer, got '{value}'" in capsys.readouterr().err


def test_out_must_be_a_folder_files_can_be_made_in(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert _parse("--out", str(tmp_path / "new" / "deeper")).out == tmp_path / "new" / "deeper"
    cases = [(str(afile), "it is a file")]
    if os.path.isdir("/proc/self"):  # Linux: no file can be made there, whatever the permissions say
        cases.append(("/proc/lab-out", "no file can be made in '/proc'"))
    for value, words in cases:
        with pytest.raises(SystemExit) as exit_:
            _parse("--out", value)
        assert exit_.value.code == 2
        assert f"error: argument --out: cannot write into '{value}': {words}" in capsys.readouterr().err


def test_ray_address_without_the_ray_executor_is_refused(tmp_path, capsys):
    """It would be ignored: the jobs would run on the local pool."""
    code = main(["lab", "--tiny", "--only", "adain_style", "--ray-address", "10.0.0.1:6379", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "needs --executor ray" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_counts_keep_their_defaults_when_not_given():
    args = _parse("--seeds", "2")
    assert args.seeds == 2 and args.jobs >= 1
    assert _parse().seeds is None


def test_without_the_lab_extra_the_command_says_what_to_install():
    """A plain ``pip install normkit`` lacks the lab's packages: a message naming the extra, not an ImportError."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('matplotlib', 'scipy', 'sklearn', 'mnist1d'):\n"
        "    sys.modules[m] = None\n"
        "from normkit.cli import main\n"
        "main(['lab', '--help'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "pip install 'normkit[lab]'" in done.stderr, done.stderr[-500:]
