"""The command line as a newcomer meets it: help that says what each option means, its default and
an example; --debug anywhere; the shipped spaces by name; `raysearch init`."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout

import pytest
import yaml

from raysearch.cli import build_parser, main
from raysearch.config import SEARCH_SPACES_DIR, packaged
from raysearch.errors import ConfigError
from raysearch.models.registry import ARCHITECTURES
from raysearch.search.space import load_search_space, parse_search_space


def _commands(parser: argparse.ArgumentParser, prefix=()):
    """(argv prefix, parser) of every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
    if prefix:
        yield prefix, parser


def _help(argv) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return out.getvalue()


COMMANDS = [argv for argv, _ in _commands(build_parser())]


def test_every_command_is_covered():
    assert {" ".join(c) for c in COMMANDS} >= {"tune", "train", "ensemble", "init", "weights fetch",
                                               "predict", "serve", "bench", "data", "demo-data"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_gives_each_option_a_meaning_a_default_and_an_example(argv):
    parser = dict(_commands(build_parser()))[argv]
    text = " ".join(_help(argv).split())  # argparse wraps lines: compare with spaces folded
    assert "examples: raysearch " + argv[0] in text, text
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"`raysearch {' '.join(argv)} {name}` has no help"
        default = action.default
        if action.option_strings and not any(default is x for x in (None, False, argparse.SUPPRESS)):
            shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            assert f"default: {shown}" in text or f"default {shown}" in text, (name, text)


def test_weights_fetch_help_lists_the_architectures():
    text = " ".join(_help(["weights", "fetch"]).split())
    missing = [a for a in ARCHITECTURES if a not in text]
    assert not missing, missing


@pytest.mark.parametrize("argv", [["--debug", "tune", "x.yaml"], ["tune", "x.yaml", "--debug"],
                                  ["weights", "fetch", "resnet18", "--to", "d", "--debug"]])
def test_debug_is_taken_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).debug is True


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {lr: [1, 2\n")
    assert main(["tune", str(bad)]) == 2  # one line without it
    with pytest.raises(Exception, match="not valid YAML"):
        main(["tune", str(bad), "--debug"])


def test_shipped_spaces_by_name_from_any_folder(tmp_path, monkeypatch):
    assert set(packaged(SEARCH_SPACES_DIR)) >= {"demo", "mura"}
    monkeypatch.chdir(tmp_path)  # not the repository: the package's own copies are found
    for given in ("mura", "mura.yaml", "search_spaces/mura.yaml"):
        assert load_search_space(given).name == "mura"
    from raysearch.config import load_trial_config

    assert load_trial_config("configs/demo_trial.yaml")[0].arch == "resnet18"
    # A folder of the same name is no config file: `raysearch demo-data demo` writes demo/, and
    # `raysearch tune demo` beside it said "cannot read demo: is a directory".
    for folder in ("demo", "demo_trial"):
        (tmp_path / folder).mkdir()
    assert load_search_space("demo").name == "demo"
    assert load_trial_config("demo_trial")[0].arch == "resnet18"
    (tmp_path / "mine").mkdir()  # a folder that names nothing shipped is still reported
    with pytest.raises(ConfigError, match="cannot read mine: is a directory"):
        load_search_space("mine")


def test_init_writes_a_starter_space_that_validates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    written = tmp_path / "search_space.yaml"
    spec = parse_search_space(yaml.safe_load(written.read_text()))
    assert spec.name == "demo" and "raysearch tune search_space.yaml" in capsys.readouterr().out
    # Never replaced by surprise; --force replaces it.
    written.write_text("# mine\n")
    assert main(["init"]) == 2
    assert "exists" in capsys.readouterr().err and written.read_text() == "# mine\n"
    assert main(["init", "--template", "mura", "--force"]) == 0
    assert load_search_space(str(written)).name == "mura"


def test_a_long_line_stays_one_line_when_the_output_is_not_a_terminal(tmp_path, capsys):
    """Piped or logged, a summary that names a long path is one line, not wrapped at the console
    width: grep and the next program see it whole."""
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    assert main(["init", str(deep / "space.yaml")]) == 0
    out = capsys.readouterr().out
    assert len(out) > 250 and out.count("\n") == 1
    assert out.strip().endswith(f"raysearch tune {deep / 'space.yaml'}")


def _readme_command_table() -> list[list[str]]:
    """The README's `## Commands` table, as GitHub renders it: a row splits at each `|` not
    escaped as `\\|` (inside code spans too), so a bare `|` in a cell adds a cell."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Commands\n", 1)[1].lstrip("\n")
    rows = section.split("\n\n", 1)[0].splitlines()  # the first table: lines up to a blank one
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def test_the_readme_command_table_has_two_cells_a_row_and_every_command():
    """The `bench` row had a bare `|` (`--finetune head|gradual|full`), which split it into four
    cells: GitHub dropped the cells past the header's two, and the row's end with them."""
    rows = _readme_command_table()
    broken = [row[0][:60] for row in rows if len(row) != 2]
    assert not broken, f"README command-table rows with a bare `|`: {broken}"
    listed = " ".join(row[0] for row in rows).replace("\\|", "|")
    for argv in COMMANDS:
        assert f"raysearch {' '.join(argv)}" in listed, f"README's table lacks {argv}"
    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "what")
    row = next(row[0] for row in rows if row[0].startswith("`raysearch bench"))
    assert row.split()[2].replace("\\|", "|") == "|".join(bench.choices), row


def test_python_dash_m_runs_the_command(tmp_path):
    """``python -m raysearch`` is the ``raysearch`` command: same answers, same exit codes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    bad = subprocess.run([sys.executable, "-m", "raysearch", "status", "nope", "--storage",
                          str(tmp_path)], check=False, capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("raysearch: error:") and "nope" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_file_for_the_other_command_names_the_command_to_use(tmp_path, monkeypatch, capsys):
    """`train` given a search space, `tune` given a trial config, or either given the name of a
    config shipped for the other: one line with the right command, exit 2, before any work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # `raysearch demo-data demo` leaves a folder of that name
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  lr: {loguniform: [1.0e-3, 3.0e-3]}\n")
    trial = tmp_path / "trial.yaml"
    trial.write_text("arch: resnet18\nlr: 0.001\ndata: {root: nowhere}\n")
    said = "{} is a {}, not a {}: run it with `raysearch {} {}`"
    shipped = "`{0}` is a shipped {1}: run it with `raysearch {2} {0}`"
    for argv, says in [
        (["train", str(space)], said.format(space, "search space", "trial config", "tune", space)),
        (["tune", str(trial)], said.format(trial, "trial config", "search space", "train", trial)),
        (["train", "demo"], shipped.format("demo", "search space", "tune")),
        (["tune", "demo_trial"], shipped.format("demo_trial", "trial config", "train")),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("raysearch: error: ") and err.endswith(says), err
        assert "\n" not in err


@pytest.mark.parametrize(("command", "says"), [
    ("status", "interrupted; `raysearch status` starts over when run again"),
    ("tune", "interrupted; run the same command to resume"),
])
def test_ctrl_c_says_what_running_the_command_again_does(monkeypatch, capsys, command, says):
    """Ctrl-C exits 130; only the commands that keep their progress promise a resume (predict,
    report, export... said `run the same command to resume` and then started over)."""
    from raysearch import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices[command].set_defaults(func=interrupted)
    argv = [command] + (["x.yaml"] if command == "tune" else [])
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == f"raysearch: {says}"


@pytest.mark.parametrize("argv", [["refit", "--seed", "-1"], ["bench", "search", "--seeds", "0", "-1"],
                                  ["refit", "--seed", str(2**32)]])
def test_a_seed_out_of_range_is_refused_before_any_work(argv, tmp_path, monkeypatch, capsys):
    """`refit --seed -1` was `unexpected ValueError: Seed must be between 0 and 2**32 - 1`, exit
    1; `bench search --seeds -1` generated the demo dataset first."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raysearch: error: {argv[-2] if argv[0] == 'refit' else '--seeds'} "
                          "must be in [0, 4294967295], got ") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "flag"), [
    (["predict", "--ensemble", "x", "a.png", "--out", ""], "--out"),
    (["tune", "demo", "--storage="], "--storage"),
    (["status", ""], "an argument"),
    (["export", "--ensemble", " ", "--format", "onnx"], "--ensemble"),
])
def test_an_empty_value_is_refused_by_name(argv, flag, tmp_path, monkeypatch, capsys):
    """`predict --out ''` wrote into the current folder and said `-> :`; `tune --storage ''`
    used the file's storage without a word."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"raysearch: error: {flag}: empty value (an unset shell variable?)")
    assert list(tmp_path.iterdir()) == []
