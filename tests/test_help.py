"""`--help` of every command: each option's default is shown in its row, flags are flags (no `<bool>`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from mlrnet_cli.cli import app

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW_START = re.compile(r"^│ (--?[\w-]+)")  # continuation lines of a row are indented further


def render_help(args: list[str]) -> str:
    # wide, so no row is cut; Rich reads COLUMNS when stdout is not a terminal
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    return ANSI.sub("", r.stdout)


def option_rows(text: str) -> dict[str, str]:
    """Option name -> the text of its row (wrapped lines joined, box drawing and extra spaces removed)."""
    rows: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("│"):
            current = None
            continue
        m = ROW_START.match(line)
        if m:
            current = rows.setdefault(m.group(1), [])
        if current is not None:
            current.append(line.strip("│ "))
    return {k: " ".join(" ".join(v).split()) for k, v in rows.items()}


def written_defaults(help_text: str | None) -> list[str]:
    """Defaults written by hand in a help string (as `\\[default: ...]`, Rich's escaped bracket)."""
    return [" ".join(d.split()) for d in re.findall(r"\[default: ([^\]]*)\]", help_text or "")]


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_shows_every_default_and_no_bool_type(name: str) -> None:

    cmd = GROUP if not name else GROUP.commands[name]  # type: ignore[attr-defined]
    text = render_help([name] if name else [])
    assert "<bool>" not in text
    rows = option_rows(text)
    ctx = cmd.make_context(name or "mlrnet", [], resilient_parsing=True)
    checked = 0
    for param in cmd.get_params(ctx):
        if getattr(param, "param_type_name", "") != "option" or param.hidden:
            continue
        row = rows.get(param.opts[0])
        assert row is not None, f"{name} --help has no row for {param.opts[0]}"
        expected = [f"[default: {d}]" for d in written_defaults(param.help)]
        if param.is_flag and param.secondary_opts:
            on, off = param.opts[0].lstrip("-"), param.secondary_opts[0].lstrip("-")
            expected.append(f"[default: {on if param.default else off}]")
            assert param.secondary_opts[0] in row
        elif not param.is_flag and param.default not in (None, [], ()):
            expected.append(f"[default: {param.default}]")
        elif not param.is_flag and not expected:
            # no default at all: only options that switch something on when given
            assert param.default in (None, [], ()), (name, param.opts)
        for e in expected:
            assert e in row, f"`mlrnet {name} --help`: {param.opts[0]} row lacks {e!r}: {row!r}"
            checked += 1
    if name in ("corrupt", "collect-losses", "train"):  # the commands whose defaults Rich used to swallow
        assert rows["--workdir"].startswith(
            "--workdir -w <path> Workspace folder that chains the stages [default: ./mlrnet-work]."
        )
        assert checked >= 10


def test_flags_take_no_value_and_have_a_negative_form() -> None:
    train = GROUP.commands["train"]  # type: ignore[attr-defined]
    ctx = train.make_context("train", ["--freeze-encoder", "--no-normalize-weights", "--no-overwrite"])
    assert ctx.params["freeze_encoder"] is True and ctx.params["normalize_weights"] is False
    assert ctx.params["overwrite"] is False
    ctx = train.make_context("train", ["--no-freeze-encoder"])
    assert ctx.params["freeze_encoder"] is False
    ev = GROUP.commands["eval"]  # type: ignore[attr-defined]
    assert ev.make_context("eval", ["--no-bf16"]).params["bf16"] is False  # the old spelling still works
    assert ev.make_context("eval", []).params["bf16"] is True


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from mlrnet_cli.cli import main\n"
        "for args in (['--help'], ['train', '--help'], ['predict', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_stage_args_passes_the_parsed_options_a_stage_takes_and_one_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlrnet_cli.commands import _app

    made: list[object] = []
    monkeypatch.setattr(_app, "progress", lambda: made.append(object()) or made[-1])

    def stage(config: object, *, data: object, out_dir: object, progress: object) -> None: ...

    def emit() -> None: ...  # an imported function whose name a stage might take

    params = {"config": 1, "data": "d.arrow", "out": "o", "workdir": None, "out_dir": emit}
    assert _app.stage_args(stage, params, out_dir="o") == {"data": "d.arrow", "out_dir": "o", "progress": made[0]}
    assert _app.stage_args(stage, {"data": 2, "out_dir": 3}, progress="mine") == {
        "data": 2,
        "out_dir": 3,
        "progress": "mine",
    }
    assert len(made) == 1  # a caller's own progress display: none is built to be thrown away
    assert _app.stage_args(stage, {"data": emit, "out_dir": 3}) == {"out_dir": 3, "progress": made[1]}
