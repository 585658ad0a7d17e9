"""--help of every script: each flag has a help text and shows its default at most once; the
description names the paper figures, the epilog gives the paper-scale command and ends with
the flags that give each figure."""
import argparse
import importlib
import re

import pytest

SCRIPTS = {"fullbatch": "Figure", "vgg_sgd": "Figures 28", "small_network": "Figures 30",
           "coordinate_network": "Figure 32", "batch_lr": "Figures 3", "train_regularisers": "Figures 2"}


def script_parser(script, monkeypatch):
    """The parser a script's parse_args builds (captured at its first parse)."""
    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args([])
    return captured[0]


@pytest.mark.parametrize("script", [*SCRIPTS, "theory"])
def test_every_flag_has_help_and_shows_its_default_once(script, monkeypatch):
    parser = script_parser(script, monkeypatch)
    formatter = parser._get_formatter()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 12
    for action in flags:
        assert action.help and action.help.strip(), f"{script} {action.option_strings} has no help"
        shown = formatter._expand_help(action)
        assert shown.count("default") <= 1, f"{script} {action.option_strings}: {shown}"
        if not any(action.default is v for v in (None, False)):
            assert "default" in shown, f"{script} {action.option_strings}: {shown}"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_description_names_figures_and_epilog_the_paper_command(script, monkeypatch):
    text = script_parser(script, monkeypatch).format_help()
    assert SCRIPTS[script] in text.split("options:")[0]
    assert re.search(rf"Paper's run.*\n\s+python {script}\.py", text), text[-400:]


# The figures each script's --help maps to flags, as its epilog's last lines name them.
EPILOG_FIGURES = {
    "fullbatch": ["Figure 1 / 6", "Figure 7", "Figure 8", "Figure 9", "Figure 10", "Figure 11",
                  "Theorem A.1"],
    "batch_lr": ["Figure 3 / 12", "Figure 4 / 16", "Figures 13, 17", "Figures 14, 18",
                 "Figures 15, 19"],
    "train_regularisers": ["Figure 20", "Figure 21", "Figure 22", "Figure 23", "Figure 2",
                           "Figure 5", "Figures 24-27"],
    "vgg_sgd": ["Figure 28", "Figure 29"], "small_network": ["Figure 30", "Figure 31"],
    "coordinate_network": ["Figure 32", "Table 1", "Table 2"],
    "theory": ["Theorem 4.5", "Theorem 4.6", "Ansatz 3.1"]}


@pytest.mark.parametrize("script", list(EPILOG_FIGURES))
def test_help_ends_with_the_flags_of_each_figure(script, monkeypatch):
    text = script_parser(script, monkeypatch).format_help()
    epilog = importlib.import_module(script).FIGURE_FLAGS
    assert text.rstrip().endswith(epilog.rstrip()), text[-600:]
    lines = epilog.splitlines()
    for figure in EPILOG_FIGURES[script]:
        line = next((l for l in lines if re.search(rf"{figure}(?![0-9])", l)), None)
        assert line is not None, f"{script} --help does not name {figure}"
        assert re.search(r"--[a-z]|the defaults", line), f"{script}: {figure} without flags: {line}"
