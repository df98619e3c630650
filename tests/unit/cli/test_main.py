"""The `llmp` entry point: subcommands come from the modules in COMMAND_MODULES."""

from __future__ import annotations

import json

import pytest

from cli import main


def test_stack_commands_are_registered():
    parser = main.build_parser()
    assert parser.parse_args(["up", "--only", "postgres,s3"]).only == "postgres,s3"
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["down"]).func.__name__ == "cmd_down"


def test_every_command_module_registers_its_commands():
    parser = main.build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    assert {"up", "down", "status"} <= set(commands)
    one = main.build_parser(("cli.stack",))
    assert set(next(a for a in one._actions if a.dest == "command").choices) == {"up", "down", "status"}


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main([])
    assert exit_info.value.code == 2


def test_status_and_down_with_nothing_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMP_STATE_DIR", str(tmp_path))
    assert main.main(["status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == []
    assert main.main(["down"]) == 0
    assert "nothing to stop" in capsys.readouterr().out
