"""``qmtl config``: read and write ``$QMTL_HOME/config.toml``."""

from typing import Annotated

import typer

from qmtl_cli._output import emit, table, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state

app = typer.Typer(help="Read and write settings in $QMTL_HOME/config.toml.", no_args_is_help=True)


def _home(ctx: typer.Context):  # type: ignore[no-untyped-def]
    from qmtl_core.config import default_home

    st = state(ctx)
    return (st.home or default_home()).expanduser()


@app.command("list")
@command
def list_(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Show every known setting with its value in config.toml."""
    from qmtl_core.config import CONFIG_KEYS, config_path, read_config

    home = _home(ctx)
    values = read_config(home)
    data = {"path": str(config_path(home)), "values": values}
    emit(data, json_mode=state(ctx).json, human=lambda c: c.print(table(
        str(config_path(home)), ["setting", "value", "meaning"],
        [[k, values.get(k), CONFIG_KEYS[k]] for k in sorted(CONFIG_KEYS)])))


@app.command("get")
@command
def get(ctx: typer.Context, key: Annotated[str, typer.Argument(help="Setting name.")],
        json_output: JsonOption = False) -> None:
    """Print one setting's value (exit 3 when it is not set)."""
    from qmtl_core.config import check_key, read_config
    from qmtl_core.errors import NotFoundError

    check_key(key)
    values = read_config(_home(ctx))
    if key not in values:
        raise NotFoundError(f"setting {key!r} is not set", hint=f"qmtl config set {key} VALUE")
    emit({"key": key, "value": values[key]}, json_mode=state(ctx).json,
         human=lambda c: c.print(t(values[key])))


@app.command("set")
@command
def set_(ctx: typer.Context, key: Annotated[str, typer.Argument(help="Setting name.")],
         value: Annotated[str, typer.Argument(help="New value.")],
         json_output: JsonOption = False) -> None:
    """Set one setting (written atomically)."""
    from qmtl_core.config import check_key, read_config, write_config

    check_key(key)
    home = _home(ctx)
    values = read_config(home)
    values[key] = value
    path = write_config(home, values)
    emit({"key": key, "value": value, "path": str(path)}, json_mode=state(ctx).json,
         human=lambda c: c.print(t(f"{key} = {value}  ({path})")))


@app.command("unset")
@command
def unset(ctx: typer.Context, key: Annotated[str, typer.Argument(help="Setting name.")],
          json_output: JsonOption = False) -> None:
    """Remove one setting (no error when it was not set)."""
    from qmtl_core.config import check_key, read_config, write_config

    check_key(key)
    home = _home(ctx)
    values = read_config(home)
    was_set = values.pop(key, None) is not None
    path = write_config(home, values)
    emit({"key": key, "removed": was_set, "path": str(path)}, json_mode=state(ctx).json,
         human=lambda c: c.print(t(f"{key} {'removed' if was_set else 'was not set'}  ({path})")))
