"""The one settings object: defaults < a TOML file < ``KILN_*`` environment < command-line flags.

Validated once at start-up; a bad value stops Kiln with a message naming where it came from
(``KILN_PORT=abc: …``, ``kiln.toml: port: …``, ``--port: …``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.errors import KilnError

ENV_PREFIX = "KILN_"


class SettingsError(KilnError):
    code = "invalid_settings"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path("./kiln-data")
    catalog: Path | None = None
    public_url: str | None = Field(default=None, description="base URL handed out in Content-Location and job outputs")
    auth: bool = Field(default=True, description="require Authorization: Bearer <key> (turn off only on a private machine)")
    sync_wait_s: float = Field(default=2.0, ge=0.0, le=600.0, description="how long a sync request may wait to start")
    retry_after_s: int = Field(default=5, ge=1, le=3600, description="Retry-After sent with 503 capacity_exhausted")
    queue_max_depth: int = Field(default=1000, ge=1)
    aging_s: float = Field(default=60.0, gt=0.0, description="a queued job competes one priority higher per this wait")
    default_rate_per_min: int = Field(default=100, ge=1)
    # the WaveSpeed-style door (/api/v2, /api/v3) has its reference's limits, per key
    wavespeed_rate_per_min: int = Field(default=120, ge=1, description="WaveSpeed-style requests per key per minute")
    wavespeed_max_concurrent: int = Field(default=20, ge=1, description="unfinished WaveSpeed-style tasks per key")
    wavespeed_sync_wait_s: float = Field(default=30.0, gt=0.0, le=600.0,
                                         description="how long enable_sync_mode waits before answering with the task as it is")
    max_upload_bytes: int = Field(default=20 * 2**20, ge=1024)
    allow_private_fetch: bool = Field(default=False, description="let image URLs point at private addresses")
    prompt_filter_file: Path | None = Field(default=None, description="regular expressions, one per line; a match is 403")
    upload_ttl_s: float = Field(default=24 * 3600.0, gt=0.0, description="uploads are deleted after this long")
    warmup: bool = Field(default=True, description="run the default model once at start, before /readyz says ready")

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def database(self) -> Path:
        return self.data_dir / "kiln.db"

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    def base_url(self) -> str:
        """Where clients reach this server: ``public_url``, else the bound address (a wildcard bind
        hands out loopback URLs; set ``public_url`` when serving other machines)."""
        if self.public_url:
            return self.public_url
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Merge the sources (``flags`` entries that are None count as absent) and validate."""
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
        for name, value in data.items():
            values[name], sources[name] = value, f"{path}: {name}"
    for name in Settings.model_fields:
        env_name = f"{ENV_PREFIX}{name.upper()}"
        if env_name in environ:
            values[name], sources[name] = environ[env_name], f"{env_name}={environ[env_name]}"
    for name, value in (flags or {}).items():
        if value is not None:
            values[name], sources[name] = value, f"--{name.replace('_', '-')} {value}"
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "settings"
        where = sources.get(field, field)
        if err["type"] == "extra_forbidden":
            raise SettingsError(f"{where}: unknown setting {field!r}") from exc
        raise SettingsError(f"{where}: {err['msg']}") from exc
