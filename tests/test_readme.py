"""The README is the user's manual: the commands it shows parse, and every flag it names exists.
(Its prose is read by people; these checks keep the two from drifting apart.)"""
import argparse
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from launch.cli import VERBS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SETTINGS_VERBS = ("train", "train-ae", "extract")  # --print-config resolves their settings without work


def readme_commands() -> list[list[str]]:
    """``ldm`` command lines of the README's code blocks (``ldm VERB ...``, ``$ ldm ...``, or a
    launcher's ``-m launch.cli VERB ...``), continuation lines joined, comments dropped; printed
    output (``ldm VERB: error: ...``) and lines with a ``...`` placeholder are left out."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            start = re.search(r"(?:^ldm|-m launch\.cli)\s+(.*)", line)
            if start is None or "..." in line:
                continue
            argv = shlex.split(start.group(1), comments=True)
            if argv and not argv[0].endswith(":"):
                commands.append(argv)
    return commands


def options(verb: str, sub: str | None = None) -> set[str]:
    """Every option string of ``verb`` and of its sub-command ``sub`` (``eval recon``), or of all its
    sub-commands when ``sub`` is None."""
    parser = build_parser(verb)._subparsers._group_actions[0].choices[verb]
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                if sub is None or name == sub:
                    found |= set(subparser._option_string_actions)
    return found


def subcommands(verb: str) -> set[str]:
    parser = build_parser(verb)._subparsers._group_actions[0].choices[verb]
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_kind():
    assert len(COMMANDS) >= 15 and {"data", "train-ae", "extract", "train", "sample", "convert"} <= {c[0] for c in
                                                                                                    COMMANDS}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to a checkout
    build_parser(argv[0]).parse_args(argv)  # SystemExit (unknown flag, bad choice) fails the test
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    if argv[0] in SETTINGS_VERBS and (config is None or not config.endswith("X.yaml")):
        assert main([*argv, "--print-config"]) == 0  # the keys and the config it names exist
        assert "resolved from" in capsys.readouterr().out


def test_verb_table_has_every_verb():
    table = re.search(r"## CLI verbs\n(.*?)\n## ", README, re.S).group(1)
    rows = re.findall(r"^\| `ldm ([a-z][a-z-]*)", table, re.M)
    assert set(rows) == set(VERBS)  # every verb has its row


def test_every_flag_the_readme_names_exists():
    """Each inline `ldm VERB ...` (the verb table's rows, the prose) names only flags VERB has."""
    spans = re.findall(r"`ldm ([a-z][a-z-]*)([^`]*)`", README)
    assert len(spans) > 50
    for verb, rest in spans:
        assert verb in VERBS, f"README names `ldm {verb}`, which is not a verb"
        sub = rest.split()[0] if rest.split() and rest.split()[0] in subcommands(verb) else None
        missing = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)) - options(verb, sub)
        assert not missing, f"README's `ldm {verb}{rest[:60]}` names {sorted(missing)}, which `ldm {verb}` lacks"


def config_keys(cls, prefix: str = "") -> set[str]:
    """The dotted keys of a config dataclass and of its sections (``data.weights``, ``val.split``)."""
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            keys |= config_keys(type(f.default_factory()), f"{prefix}{f.name}.")
    return keys


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its package is missing
        return False


def test_every_settings_key_the_readme_names_exists():
    """A `section.key` the README names (`data.weights`, `val.data=DIR`) is a key of `ldm train` or
    `ldm train-ae` (or a module, as `data.attributes`): a renamed key leaves no stale sentence."""
    from launch.train import TrainConfig
    from launch.train_ae import TrainAEConfig

    known = config_keys(TrainConfig) | config_keys(TrainAEConfig)
    named = {key for span in re.findall(r"`([^`\n]+)`", README) for key in
             re.findall(r"(?<![\w./-])((?:data|model|flow|optim|engine|val|profile)\.[a-z_]+)(?![\w.(])", span)}
    assert len(named) > 20
    unknown = {key for key in named - known if not is_module(key)}
    assert not unknown, f"README names {sorted(unknown)}, which neither `ldm train` nor `ldm train-ae` has"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_contents_lists_every_section_and_every_link_finds_its_heading():
    headings = re.findall(r"^#{2,3} (.+)$", README, re.M)
    anchors = {anchor(h) for h in headings}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links and not set(links) - anchors, f"links to no heading: {sorted(set(links) - anchors)}"
    contents = re.search(r"^\*\*Contents\*\*: (.+?)\n\n", README, re.M | re.S).group(1)
    sections = [anchor(h) for h in re.findall(r"^## (.+)$", README, re.M)]
    assert re.findall(r"\]\(#([^)]+)\)", contents) == sections  # every section, in the README's order
