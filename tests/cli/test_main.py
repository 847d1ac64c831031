"""The top level of `clipdense`: --version, and Ctrl-C outside training."""

import clipdense
from clipdense.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clipdense {clipdense.__version__}"


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    import clipdense.cli.datasets as datasets

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "cmd_check_dataset", interrupted)
    code = main(["check-dataset", "--dataset", "ade20k", "--root", "nowhere"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("clipdense: interrupted")


def test_help_imports_neither_torch_nor_open_clip():
    """`clipdense --help` and `clipdense segment --help` answer at once: no heavy import to build the parser."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom clipdense.cli import main\nfor argv in (['--help'], ['segment', '--help']):\n"
        "    main(argv)\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
