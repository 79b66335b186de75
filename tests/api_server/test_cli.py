"""`tessera serve` argument handling: help, and errors that exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api_server.cli import SERVER_GROUP, main, make_parser
from engine_core.args import GROUPS, engine_arg_names, flag_of


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_shows_every_engine_argument_in_its_group(capsys):
    code, out, _ = run_main(["serve", "--help"], capsys)
    assert code == 0
    for title in (SERVER_GROUP, *GROUPS):
        assert f"\n{title}:\n" in out, title
    for name in engine_arg_names():
        assert flag_of(name) in out, name
    for flag in ("--host", "--port", "--api-key", "--chat-template", "--allowed-origins"):
        assert flag in out


def test_unknown_model_exits_2(capsys):
    code, _, err = run_main(["serve", "--model", "/no/such/model"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--model=/no/such/model" in err


def test_positional_model_and_server_defaults():
    args = make_parser().parse_args(["serve", "some/model"])
    assert args.model_tag == "some/model"
    assert (args.port, args.response_role, args.allowed_origins) == (8000, "assistant", ["*"])


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--max-model-len", "abc"], "--max-model-len"),
        (["--dtype", "int3"], "--dtype"),
        (["--model", "other/model"], "--model"),
        (["--allowed-origins", "not json"], "--allowed-origins"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice"),
        (["--tool-call-parser", "hermes"], "--tool-call-parser"),
        (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
        (["--port", "70000"], "--port"),
        (
            ["--distributed-executor-backend", "external_launcher"],
            "--distributed-executor-backend=external_launcher",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, names, capsys):
    code, _, err = run_main(["serve", "tessera/smollm2-135m-instruct", *argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tessera serve: error:") and names in lines[0]


def test_the_server_starts_its_engine_before_importing_torch():
    """Everything `_serve` imports before the engine cores start stays free of transformers
    and torch: they take seconds to import, which would come before the cores' own start
    instead of overlapping it (the tokenizer loads in a thread once the cores have started)."""
    code = (
        "import sys, api_server.cli, engine_core.async_client; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
