"""The command line: `megatron-gem serve` (pyproject's console script megatron_gem.cli:main) and
`python -m megatron_gem.serve` parse the same flags; the server listens on 127.0.0.1 unless told."""

import pytest

from megatron_gem import cli
from megatron_gem.serve.cli import build_parser, config_from_args


def test_megatron_gem_command(capsys):
    assert cli.main(["--help"]) == 0 and "serve" in capsys.readouterr().out
    assert cli.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "--api-key" in capsys.readouterr().out


def test_defaults_and_checks(tmp_path, capsys):
    cfg = config_from_args(build_parser().parse_args([str(tmp_path)]))
    assert cfg.host == "127.0.0.1" and cfg.api_key is None and not cfg.auto_truncate
    cfg = config_from_args(build_parser().parse_args([str(tmp_path), "--max-tokens-cap", "16"]))
    assert cfg.default_max_tokens == 16  # the default answer length follows a lower cap
    with pytest.raises(SystemExit):
        cli.main(["serve", str(tmp_path / "missing")])
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", str(tmp_path), "--max-batch-tokens", "8"])
    assert "max-batch-tokens=8 is below max-input-tokens=512" in capsys.readouterr().err


def test_pyproject_declares_the_command():
    import os

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["megatron-gem"] == "megatron_gem.cli:main"
    import re

    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in project["optional-dependencies"]["serve"]}
    assert {"fastapi", "uvicorn", "prometheus-client"} <= names
