"""Where qmtl keeps its state and how it is configured.

Precedence for every setting: command-line option, then environment variable, then
``$QMTL_HOME/config.toml``, then the default.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmtl_core.errors import ConfigError

#: Settings that ``qmtl config set`` accepts, with what each means.
CONFIG_KEYS: dict[str, str] = {
    "server": "URL of a `qmtl serve` to talk to (remote mode); empty means local mode",
    "token": "bearer token used in remote mode",
    "database_url": "SQLAlchemy URL of the store, e.g. postgresql+psycopg://user@host/db",
    "worlds_dir": "directory holding the world policy files",
    "allow_live": ("true: commands that can make or keep a strategy live (promote, approve, rollback, "
                   "resume, campaign-loop --execute) act as if given --allow-live (for cron); default false"),
    "checkpoint_key": "file holding the Ed25519 key that signs ledger checkpoints (qmtl audit keygen); "
                      "keep it where the database's users cannot read it",
    "checkpoint_verifier": "the checkpoint public key (name+id+key) or the .pub file holding it; "
                           "qmtl audit verify --checkpoint checks signatures against it",
    "checkpoint_dir": "directory where the campaign loop and qmtl serve publish a signed checkpoint "
                      "after each change (append-only, outside the store)",
}

ENV_VARS: dict[str, str] = {
    "home": "QMTL_HOME",
    "worlds_dir": "QMTL_WORLDS_DIR",
    "server": "QMTL_SERVER",
    "database_url": "QMTL_DATABASE_URL",
    "token": "QMTL_TOKEN",
    "allow_live": "QMTL_ALLOW_LIVE",
    "checkpoint_key": "QMTL_CHECKPOINT_KEY",
    "checkpoint_verifier": "QMTL_CHECKPOINT_VERIFIER",
    "checkpoint_dir": "QMTL_CHECKPOINT_DIR",
}


def default_home() -> Path:
    """``$QMTL_HOME`` or ``~/.qmtl``."""
    env = os.environ.get("QMTL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".qmtl"


def config_path(home: Path) -> Path:
    """The config file inside a qmtl home."""
    return home / "config.toml"


def read_config(home: Path) -> dict[str, Any]:
    """Read ``config.toml``; a missing file is an empty config, a broken one an error."""
    import tomllib

    path = config_path(home)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", hint="fix or delete the file") from None
    unknown = sorted(set(parsed) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r}", hint=_suggest(unknown[0]))
    return parsed


def _flag(name: str, value: Any) -> bool:
    """A boolean setting: TOML true/false or the text true/false; anything else is an error, so a
    typo never turns into consent."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"setting {name} must be true or false, got {value!r}",
                      hint=f"e.g. qmtl config set {name} true (or {ENV_VARS.get(name, name)}=true)")


def check_key(key: str) -> None:
    """Refuse a setting name ``qmtl config`` does not know."""
    if key not in CONFIG_KEYS:
        raise ConfigError(f"unknown setting {key!r}", hint=_suggest(key))


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known settings: " + ", ".join(sorted(CONFIG_KEYS))


def write_config(home: Path, values: dict[str, Any]) -> Path:
    """Write ``config.toml`` atomically (temp file + rename), so a crash never leaves half a file."""
    import tomli_w

    path = config_path(home)
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".toml", dir=home)
    try:
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(values, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _path(value: Any) -> Path | None:
    return Path(str(value)).expanduser() if value else None


@dataclass
class Settings:
    """Resolved settings for one invocation."""

    home: Path = field(default_factory=default_home)
    worlds_dir: Path = Path("worlds")
    server: str | None = None
    token: str | None = None
    database_url: str | None = None
    #: The standing live intent (config ``allow_live`` / ``QMTL_ALLOW_LIVE``), for unattended runs.
    allow_live: bool = False
    checkpoint_key: Path | None = None
    checkpoint_verifier: str | None = None
    checkpoint_dir: Path | None = None

    @classmethod
    def resolve(cls, *, home: Path | None = None, worlds_dir: Path | None = None,
                server: str | None = None) -> "Settings":
        """Combine options, environment and config file into one ``Settings``."""
        home = (home or default_home()).expanduser()
        cfg = read_config(home)
        env = os.environ

        def pick(name: str, option: Any) -> Any:
            if option not in (None, ""):
                return option
            var = ENV_VARS.get(name)
            if var and env.get(var):
                return env[var]
            value = cfg.get(name)
            return value if value not in (None, "") else None

        return cls(
            home=home,
            worlds_dir=Path(pick("worlds_dir", worlds_dir) or "worlds").expanduser(),
            server=pick("server", server),
            token=pick("token", None),
            database_url=pick("database_url", None),
            allow_live=_flag("allow_live", pick("allow_live", None)),
            checkpoint_key=_path(pick("checkpoint_key", None)),
            checkpoint_verifier=pick("checkpoint_verifier", None),
            checkpoint_dir=_path(pick("checkpoint_dir", None)),
        )

    @property
    def store_url(self) -> str:
        """The store's SQLAlchemy URL: ``database_url`` or SQLite at ``$QMTL_HOME/qmtl.db``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'qmtl.db'}"

    @property
    def risk_refs_dir(self) -> Path:
        """Where the risk hub resolves a snapshot's ``*_ref`` files (nowhere else)."""
        return self.home / "risk-refs"

    def identity(self) -> str:
        """Who is acting in local mode: the OS account of the effective uid.

        Never an environment variable (``LOGNAME``, ``USER``) or a flag: anyone can set those. Local
        mode therefore cannot tell apart people who share an OS account or the database file;
        remote mode (``qmtl serve`` with one token per person) separates duties.
        """
        import pwd

        uid = os.geteuid()
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:  # no user database entry (some containers): the uid itself
            return f"uid-{uid}"
