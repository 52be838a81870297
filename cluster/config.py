"""Serving configuration: one frozen msgspec tree, read from YAML or TOML,
overridden by command-line flags. Every field has a default and a one-line
doc; validation happens at construction; an unknown key is an error naming
the key (and the file)."""

import tomllib
from pathlib import Path

import msgspec

from ..kernels.linear import DEFAULT_ROWS, check_rows
from ..router.params import parse_speculation


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"         # interface the gRPC server binds; 0.0.0.0 exposes it to the network
    port: int = 50051               # gRPC port; 0 picks a free one
    token: str | None = None        # bearer token every call must carry ("authorization: Bearer T")
    tls_cert: str | None = None     # PEM certificate chain file; with tls_key, serve TLS
    tls_key: str | None = None      # PEM private key file
    max_in_flight: int = 256        # streams open at once; one more gets RESOURCE_EXHAUSTED
    drain_timeout_s: float = 120.0  # on SIGTERM, wait this long for in-flight requests, then abort them

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in 0..65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("server.tls_cert and server.tls_key go together: set both or neither")
        if self.max_in_flight < 1:
            raise ConfigError(f"server.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.token is not None and not self.token:
            raise ConfigError("server.token must not be empty (leave it unset for no authentication)")


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str | None = None        # checkpoint directory; None: the bundled tiny MoE
    device: str = "cpu"             # torch device of the model (cuda on GPU nodes)
    dtype: str = "float32"          # float32 | bfloat16
    max_batch: int = 16             # KV-cache slots: requests running at once
    max_seq_len: int = 1024         # context per request (prompt + new tokens)
    max_tokens_per_step: int = 4096  # per-step token budget (longer prompts are prefilled in parts)
    speculation: str | dict = "auto"  # "auto", "off" or a dict of router.params.SpeculationConfig fields
    ep: int = 1                     # expert-parallel degree (Ray workers); 1: the model runs in the router
    few_row_linears: int = DEFAULT_ROWS  # CPU float32: rows up to which dense weights use a prepared copy
                                         # (faster decode, 2x their memory; 0: no copies), in every process

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"engine.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_batch < 1 or self.max_seq_len < 2:
            raise ConfigError(f"engine.max_batch must be >= 1 and engine.max_seq_len >= 2, got "
                              f"{self.max_batch}, {self.max_seq_len}")
        if self.ep < 1:
            raise ConfigError(f"engine.ep must be >= 1, got {self.ep}")
        try:
            check_rows(self.few_row_linears, "engine.few_row_linears")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            parse_speculation(self.speculation)
        except ValueError as e:
            raise ConfigError(f"engine.speculation: {e}") from None


class RayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    address: str | None = None      # None: start a local Ray instance; "auto" or host:port: join a cluster
    num_cpus: int | None = None     # CPUs of a local instance (None: all)
    router_cpus: float = 1.0        # CPUs the router actor reserves
    metrics_export_port: int | None = 8080  # Prometheus port of a local instance (None: Ray's choice)
    include_dashboard: bool | None = None   # local instance: start the Ray dashboard (None: if installed)
    namespace: str = "specmoe"      # Ray namespace of the router actor


class ServeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: ServerConfig = ServerConfig()
    engine: EngineConfig = EngineConfig()
    ray: RayConfig = RayConfig()


def _convert(data: dict, where: str) -> ServeConfig:
    try:
        return msgspec.convert(data, ServeConfig)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Object contains unknown field `prot` - at `$.server`"
        msg = str(e)
        if "unknown field" in msg:
            field = msg.split("`")[1]
            path = msg.rsplit("at `$", 1)[-1].rstrip("`") if "at `$" in msg else ""
            key = f"{path.lstrip('.')}.{field}" if path else field
            raise ConfigError(f"{where}: unknown key {key!r}") from None
        raise ConfigError(f"{where}: {msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> ServeConfig:
    """The config in `path` (.yaml, .yml or .toml; None: the defaults) with
    `overrides` applied: {"server.port": 8000, ...}; a None value leaves the key as it is."""
    data: dict = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from None
        elif p.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{p}: not valid TOML: {e}") from None
        else:
            raise ConfigError(f"config file {p}: expected a .yaml, .yml or .toml file")
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{where}: {section!r} must be a mapping")
        data[section][name] = value
    return _convert(data, where if not overrides else f"{where} with flags")
