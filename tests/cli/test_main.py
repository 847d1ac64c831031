"""The top level of `clipdense`: --version, and Ctrl-C outside training."""

import pytest

import clipdense
from clipdense.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"clipdense {clipdense.__version__}"


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    import clipdense.cli.datasets as datasets

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "cmd_check_dataset", interrupted)
    code = main(["check-dataset", "--dataset", "ade20k", "--root", "nowhere"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("clipdense: interrupted")
