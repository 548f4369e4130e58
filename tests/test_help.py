"""Every console script's --help: each default shown once, none shown as "None"; shared flags alike."""

import argparse
import re

import pytest

from ldm.cli import data, restore, serve, shapes, train_unet, train_vae, txt2img

PARSERS = {
    "ldm-img2img": lambda: txt2img.build_parser(editing=True),
    "ldm-txt2img": txt2img.build_parser,
    "ldm-train-unet": train_unet.build_parser,
    "ldm-train-vae": train_vae.build_parser,
    "ldm-data": data.build_parser,
    "ldm-shapes": shapes.build_parser,
    "ldm-serve": serve.build_parser,
    "ldm-restore": restore.build_parser,
}


def help_texts():
    """(name, help text) of every parser and sub-command."""
    for name, build in PARSERS.items():
        parser = build()
        yield name, parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield f"{name} {sub}", subparser.format_help()


@pytest.mark.parametrize(
    "name, text", list(help_texts()), ids=lambda x: x if isinstance(x, str) and x.startswith("ldm") else ""
)
def test_each_default_is_shown_once_and_never_as_none(name, text):
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat, name
    for entry in re.split(r"\s(?=-{1,2}[a-z])", flat):  # one option's help at a time
        assert entry.count("(default:") <= 1, (name, entry)


def test_both_training_commands_take_quiet():
    for build in (train_unet.build_parser, train_vae.build_parser):
        assert "--quiet" in build().format_help()
