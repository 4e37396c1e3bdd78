"""What a new operator trips on (issue 21): bad numbers on the command line, `check`'s summary."""

from __future__ import annotations

import argparse

import pytest

from proxy import cli


def _numeric_options() -> list[tuple[str, argparse.Action]]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(f"{name} {a.option_strings[-1]}", a) for name, p in sub.choices.items() for a in p._actions
            if isinstance(a.default, (int, float)) and not isinstance(a.default, bool)]


def test_every_numeric_option_has_a_range():
    options = _numeric_options()
    assert {"serve --port", "serve --workers", "serve --max-body-size", "mock-upstream --context"} <= dict(options).keys()
    for label, action in options:
        assert getattr(action.type, "__qualname__", "").startswith("ranged."), f"{label} is not range-checked"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "argument --port: must be an integer from 1 to 65535, got 99999"),
    (["serve", "--port", "0"], "argument --port: must be an integer from 1 to 65535, got 0"),
    (["serve", "--max-body-size", "-1"], "argument --max-body-size: must be an integer from 1 to 2147483647, got -1"),
    (["serve", "--workers", "0"], "argument --workers: must be an integer from 1 to 256, got 0"),
    (["serve", "--backlog", "0"], "argument --backlog: must be an integer from 1 to 2147483647, got 0"),
    (["serve", "--grace-period", "-5"], "argument --grace-period: must be a number from 0 to 86400, got -5"),
    (["serve", "--grace-period", "nan"], "argument --grace-period: must be a number from 0 to 86400, got nan"),
    (["serve", "--port", "http"], "argument --port: must be an integer from 1 to 65535, got 'http'"),
    (["mock-upstream", "--context", "0"], "argument --context: must be an integer from 1 to 100000000, got 0"),
])
def test_a_number_out_of_range_exits_2_naming_the_option_and_the_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == cli.EXIT_CONFIG
    assert message in capsys.readouterr().err
