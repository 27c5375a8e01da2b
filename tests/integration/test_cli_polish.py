"""Command-line polish: --version, help text, did-you-mean, defaults of predict/test."""

from __future__ import annotations

import pytest

from clipsam.cli import clean_help, main
from tests.integration.conftest import DEMO_CONFIG


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import clipsam

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clipsam {clipsam.__version__}"


def test_top_level_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "test", "predict", "clipsam data", "clipsam export", "--version"):
        assert command in out, command


def test_subcommand_help_has_no_sphinx_markup_and_lists_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    out = capsys.readouterr().out
    assert ":class:`" not in out and ":func:`" not in out and "``" not in out
    assert "--model.evaluation.mask_source {sam,score}" in out
    assert "--model.evaluation.threshold_method {f1,fpr}" in out
    assert "clip_boost or clip_masked" in " ".join(out.split())
    assert clean_help("see :func:`clipsam.fusion.fuse_scores` and ``x``; :class:`~a.b.Segmenter`") == (
        "see clipsam.fusion.fuse_scores and x; Segmenter"
    )


def test_mistyped_keys_get_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", DEMO_CONFIG, "--model.evaluation.fusin=clip"])
    assert exit_info.value.code == 2
    assert "did you mean --model.evaluation.fusion?" in capsys.readouterr().err


def test_predict_and_test_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--config", DEMO_CONFIG, "--print_config"])
    assert "return_predictions: false" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["test", "--config", DEMO_CONFIG, "--print_config"])
    assert "verbose: false" in capsys.readouterr().out
