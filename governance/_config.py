"""Settings from the environment. Every variable has a default that works on one machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DB_URL = "sqlite:///./data/memwarden.db"
DEFAULT_RETENTION_POLICY = str(Path(__file__).resolve().parent.parent / "policies"
                               / "retention.yaml")

ENVIRONMENT_VARIABLES = {
    "MEMWARDEN_DB_URL": "database URL: sqlite:///path or postgresql+psycopg://user@host/db",
    "MEMWARDEN_API_HOST": "interface the REST API binds to",
    "MEMWARDEN_API_PORT": "port of the REST API",
    "MEMWARDEN_DASHBOARD_PORT": "port of the compliance dashboard (Streamlit), on the API's host",
    "MEMWARDEN_MAX_TEXT_BYTES": "largest memory text accepted, in UTF-8 bytes",
    "MEMWARDEN_ACTOR": "the local operator's name, for CLI and SDK commands without a key",
    "MEMWARDEN_API_KEY": "the CLI acts as this API key's principal (read by the CLI itself)",
    "MEMWARDEN_MASTER_KEY":
        "base64 AES-256 master key wrapping the per-subject keys (else a key file)",
    "MEMWARDEN_KEY_FILE": "master key file, created 0600 on first start "
                          "(default: master.key in MEMWARDEN_DATA_DIR)",
    "MEMWARDEN_DATA_DIR": "folder for local state; `memwarden up` keeps the admin API key there",
    "MEMWARDEN_PII_SCAN": "scan every write for personal data with Presidio (1, default) or not "
                          "(0: load tests and benchmarks that are not about personal data)",
    "MEMWARDEN_KAFKA_BOOTSTRAP": "Kafka bootstrap servers (host:port,...): the distributed mode; "
                                "unset = embedded",
    "MEMWARDEN_KAFKA_TOPIC": "Kafka topic the relay publishes the log to (memwarden.events)",
    "MEMWARDEN_KAFKA_PARTITIONS": "partitions of that topic when the relay creates it (6)",
    "MEMWARDEN_BUNDLE_PASSPHRASE": "passphrase wrapping the keys in `memwarden bundle export "
                                   "--with-keys` (else asked for)",
    "MEMWARDEN_RETENTION_POLICY": "retention rules file (default: policies/retention.yaml)",
    "MEMWARDEN_BASE_MODEL": "local Hugging Face causal LM directory that adapters and KV caches "
                            "are made for (default: a tiny model built under the data dir)",
    "MEMWARDEN_CONVERSION_POLICY": "conversion policy file (default: policies/conversion.yaml)",
    "MEMWARDEN_RETENTION_INTERVAL": "seconds between the retention sweeps `memwarden up` runs",
    "MEMWARDEN_ES_URL": "Elasticsearch URL for memory search; unset = the database's own "
                        "full-text index (SQLite FTS5, PostgreSQL tsvector)",
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


def _switch(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false, on/off); got {raw!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    db_url: str = DEFAULT_DB_URL
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    dashboard_port: int = 8501
    max_text_bytes: int = 64 * 1024
    actor: str | None = None
    data_dir: str = "./data"
    pii_scan: bool = True
    kafka_bootstrap: str | None = None
    kafka_topic: str = "memwarden.events"
    kafka_partitions: int = 6
    retention_policy: str = DEFAULT_RETENTION_POLICY
    retention_interval: int = 300
    es_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            db_url=env.get("MEMWARDEN_DB_URL") or DEFAULT_DB_URL,
            api_host=env.get("MEMWARDEN_API_HOST") or "127.0.0.1",
            api_port=_int(env, "MEMWARDEN_API_PORT", 8000),
            dashboard_port=_int(env, "MEMWARDEN_DASHBOARD_PORT", 8501),
            max_text_bytes=_int(env, "MEMWARDEN_MAX_TEXT_BYTES", 64 * 1024),
            actor=env.get("MEMWARDEN_ACTOR") or None,
            data_dir=env.get("MEMWARDEN_DATA_DIR") or "./data",
            pii_scan=_switch(env, "MEMWARDEN_PII_SCAN", True),
            kafka_bootstrap=env.get("MEMWARDEN_KAFKA_BOOTSTRAP") or None,
            kafka_topic=env.get("MEMWARDEN_KAFKA_TOPIC") or "memwarden.events",
            kafka_partitions=_int(env, "MEMWARDEN_KAFKA_PARTITIONS", 6),
            retention_policy=env.get("MEMWARDEN_RETENTION_POLICY") or DEFAULT_RETENTION_POLICY,
            retention_interval=_int(env, "MEMWARDEN_RETENTION_INTERVAL", 300),
            es_url=env.get("MEMWARDEN_ES_URL") or None,
        )
