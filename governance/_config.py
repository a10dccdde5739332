"""Settings from the environment. Every variable has a default that works on one machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_DB_URL = "sqlite:///./data/memwarden.db"

ENVIRONMENT_VARIABLES = {
    "MEMWARDEN_DB_URL": "database URL: sqlite:///path or postgresql+psycopg://user@host/db",
    "MEMWARDEN_API_HOST": "interface the REST API binds to",
    "MEMWARDEN_API_PORT": "port of the REST API",
    "MEMWARDEN_MAX_TEXT_BYTES": "largest memory text accepted, in UTF-8 bytes",
    "MEMWARDEN_ACTOR": "the local operator's name, for CLI and SDK commands without a key",
    "MEMWARDEN_API_KEY": "the CLI acts as this API key's principal (read by the CLI itself)",
    "MEMWARDEN_MASTER_KEY": "base64 AES-256 master key wrapping the per-subject keys (else a key file)",
    "MEMWARDEN_KEY_FILE": "master key file, created 0600 on first start (default ./data/master.key)",
    "MEMWARDEN_DATA_DIR": "folder for local state; `memwarden up` keeps the admin API key there",
}


class ConfigError(ValueError):
    pass


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number; got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive; got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    db_url: str = DEFAULT_DB_URL
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_text_bytes: int = 64 * 1024
    actor: str | None = None
    data_dir: str = "./data"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            db_url=env.get("MEMWARDEN_DB_URL") or DEFAULT_DB_URL,
            api_host=env.get("MEMWARDEN_API_HOST") or "127.0.0.1",
            api_port=_int(env, "MEMWARDEN_API_PORT", 8000),
            max_text_bytes=_int(env, "MEMWARDEN_MAX_TEXT_BYTES", 64 * 1024),
            actor=env.get("MEMWARDEN_ACTOR") or None,
            data_dir=env.get("MEMWARDEN_DATA_DIR") or "./data",
        )
