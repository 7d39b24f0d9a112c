"""The command line's error contract: the project's own errors (VaeError) are one line and exit
status 2; anything else is a bug or a library failure and keeps its traceback."""

from pathlib import Path

import pytest

from flows import cli, dvc_runner, lineage, model_io, params, promotion, registry, sweep, tracking
from vae_core import config
from vae_core.data import errors as data_errors
from vae_core.errors import VaeError
from vae_core.training import checkpoint, trainer


def test_project_errors_are_one_line_with_status_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere.yaml"
    rc = cli.main(["train", "--params", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"error: {missing}: parameters file not found\n"
    assert not (tmp_path / "out").exists()


def test_other_errors_keep_their_traceback(monkeypatch, tmp_path: Path) -> None:
    def broken(args) -> int:
        raise RuntimeError("a genuine bug")

    add, _ = cli.COMMANDS["train"]
    monkeypatch.setitem(cli.COMMANDS, "train", (add, broken))
    with pytest.raises(RuntimeError, match="a genuine bug"):
        cli.main(["train", "--out", str(tmp_path)])


def test_every_project_error_class_derives_from_vae_error() -> None:
    errors = [dvc_runner.DvcError, lineage.LineageError, model_io.ModelLoadError]
    errors += [params.ParamsError, promotion.GateError, registry.RegistryError, sweep.SweepError]
    errors += [tracking.TrackingUnavailable, config.ConfigError, data_errors.DataError]
    errors += [checkpoint.ModelFileError, trainer.NonFiniteLossError]
    errors += [trainer.CheckpointMismatchError]
    assert [e for e in errors if not issubclass(e, VaeError)] == []
