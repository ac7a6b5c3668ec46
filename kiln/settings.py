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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from kiln.catalog.schema import Optimizations
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
    redis_url: str | None = Field(default=None, description="redis://host:6379/0: queue jobs, keep API keys and "
                                                            "rate counters in Redis (scale-out), not in the "
                                                            "embedded SQLite file")
    lease_s: float = Field(default=30.0, gt=0.0, le=3600.0,
                           description="with Redis: a worker silent this long loses its job to another worker")
    job_max_attempts: int = Field(default=3, ge=1, le=100,
                                  description="a job whose worker dies this many times ends failed (worker_lost)")
    default_rate_per_min: int = Field(default=100, ge=1)
    # the WaveSpeed-style door (/api/v2, /api/v3) has its reference's limits, per key
    wavespeed_rate_per_min: int = Field(default=120, ge=1, description="WaveSpeed-style requests per key per minute")
    wavespeed_max_concurrent: int = Field(default=20, ge=1, description="unfinished WaveSpeed-style tasks per key")
    wavespeed_sync_wait_s: float = Field(default=30.0, gt=0.0, le=600.0,
                                         description="how long enable_sync_mode waits before answering with the task as it is")
    max_upload_bytes: int = Field(default=20 * 2**20, ge=1024)
    allow_private_fetch: bool = Field(default=False, description="let image URLs point at private addresses")
    lora_max_bytes: int = Field(default=2 * 2**30, ge=1024, description="largest LoRA file fetched")
    lora_cache_bytes: int = Field(default=20 * 2**30, ge=1024, description="LoRA files kept on disk, least recently used evicted")
    lora_fetch_timeout_s: float = Field(default=300.0, gt=0.0, le=3600.0, description="time to download one LoRA")
    hf_endpoint: str = Field(default="https://huggingface.co", description="where a LoRA named by Hugging Face repo id is fetched")
    prompt_filter_file: Path | None = Field(
        default=None, description="words and phrases (whole words) and re:PATTERN regular expressions, one per line; "
        "a match is 403 (kiln/api/policy.py)")
    safety_checker: str | None = Field(
        default=None, max_length=1024,
        description="image safety classifier: a Stable Diffusion safety checker directory, or its hub id in the "
                    "Hugging Face cache (empty: no classifier)",
    )
    safety_checker_default: bool = Field(
        default=True, description="run the classifier for requests that do not say (with safety_checker set)"
    )
    upload_ttl_s: float = Field(default=24 * 3600.0, gt=0.0, description="uploads are deleted after this long")
    # assets on S3-compatible storage (unset bucket: the folder data_dir/assets); unset credentials,
    # region and endpoint fall back to boto3's default chain (AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION, ...)
    s3_bucket: str | None = Field(default=None, description="keep assets in this S3-compatible bucket")
    s3_endpoint_url: str | None = Field(default=None, description="S3 API endpoint (MinIO, R2, ...); unset: AWS")
    s3_region: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = Field(default=None, description="never logged or shown")
    s3_prefix: str = Field(default="", description="key prefix inside the bucket, e.g. kiln/")
    warmup: bool = Field(default=True, description="run the default model once at start, before /readyz says ready")
    local_worker: bool = Field(default=True, description="run a worker in the API process (off: jobs run only "
                                                         "on `kiln worker` processes; needs redis_url)")
    worker_port: int = Field(default=8081, ge=0, le=65535,
                             description="`kiln worker`: port of /healthz, /readyz and /metrics (0: none)")
    shutdown_grace_s: float = Field(default=30.0, ge=0.0, le=3600.0,
                                    description="`kiln worker`: on SIGTERM, how long the job in hand may take to "
                                                "finish before it is handed back to the queue")
    optimize: Optimizations | None = Field(
        default=None, description="speed switches for every model, over the catalog's: a table in the settings "
                                  "file, or NAME=VALUE,... (KILN_OPTIMIZE=compile=off,fuse_qkv=false)")
    compile_cache_dir: Path | None = Field(default=None, description="torch.compile's on-disk cache, so that a "
                                                                     "restart does not compile again (default: "
                                                                     "data_dir/compile-cache)")

    @field_validator("optimize", mode="before")
    @classmethod
    def _optimize_pairs(cls, value: object) -> object:
        """``compile=off,text_cache=0`` (from the environment or a flag) as a table."""
        if not isinstance(value, str):
            return value
        table: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, sep, setting = pair.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected NAME=VALUE pairs separated by commas, got {pair!r}")
            table[name.strip()] = setting.strip()
        return table

    @field_validator("hf_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("s3_bucket", "s3_region", "s3_access_key")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return (value or "").strip() or None

    @field_validator("s3_secret_key", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _s3_credentials(self) -> Settings:
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError(
                "s3_access_key and s3_secret_key go together: set both, or neither to use the AWS environment"
            )
        return self

    @model_validator(mode="after")
    def _workerless_needs_redis(self) -> Settings:
        if not self.local_worker and not self.redis_url:
            raise ValueError("local_worker off (--no-worker) needs redis_url (--redis): without Redis no "
                             "`kiln worker` process can take the jobs")
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("safety_checker")
    @classmethod
    def _safety_checker(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is not None and value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().is_dir():
            raise ValueError(f"no directory {value}")
        return value

    @property
    def database(self) -> Path:
        return self.data_dir / "kiln.db"

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    @property
    def loras_dir(self) -> Path:
        return self.data_dir / "loras"

    @property
    def compile_cache(self) -> Path:
        return self.compile_cache_dir or self.data_dir / "compile-cache"

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
            name = ".".join(str(part) for part in err["loc"])  # optimize.speed: a switch inside a table
            raise SettingsError(f"{where}: unknown setting {name!r}") from exc
        raise SettingsError(f"{where}: {err['msg']}") from exc
