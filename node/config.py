"""The node's configuration: one TOML file, embedded defaults, ``HARMONODE_…`` environment overrides.

Loaded once (``load_config``) and passed down explicitly as frozen dataclasses. An environment variable
``HARMONODE_<SECTION>_<KEY>`` overrides ``[section] key`` (``HARMONODE_NODE_PORT=11113``); list values
are comma-separated (``HARMONODE_NODE_ALLOWED_CALLING_AES=CT1,MR1``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from handlers.peer import Peer, check_ae_title
from handlers.permissions import PeerPermission
from storage.audit import AuditTrail
from storage.exports import ExportSettings
from storage.queue import DELIVERY_POLICY, QueueSettings
from storage.store import StoreSettings
from storage.syslog import SyslogTarget

ENV_PREFIX = "HARMONODE_"


class ConfigError(ValueError):
    """The configuration file or an environment override is invalid."""


@dataclass(frozen=True)
class TlsConfig:
    """Optional TLS on the listening port (DICOM over TLS, PS3.15 B.1)."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # when set, peers must present a certificate signed by this CA
    require_client_cert: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """Identity and door of the node: AE title, address, where data lives, who may call."""

    ae_title: str = "HARMONODE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: str = "var"
    allowed_calling_aes: tuple[str, ...] = ()  # empty: any calling AE title
    allowed_addresses: tuple[str, ...] = ()  # empty: any peer address
    require_called_ae: bool = True
    max_pdu_size: int = 4 * 1024 * 1024  # advertised; a longer PDU closes the connection (0: 64 MiB cap)
    max_associations: int = 16  # established associations
    max_connections: int = 64  # open sockets, negotiating or established
    max_connections_per_address: int = 16
    max_negotiating: int = 16  # sockets that have not completed association (idle, slow, malformed peers)
    max_negotiating_per_address: int = 4
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 10.0  # to complete association (TLS handshake and A-ASSOCIATE-RQ) and release
    dimse_timeout_s: float = 60.0
    fsync: bool = True  # never turn off in production: the success status promises durability
    max_versions: int = 100  # versions kept of one SOP Instance UID in one series; more are refused (0: no limit)
    max_inflated_mb: int = 64  # a deflated dataset that inflates further is refused (0: no limit)
    max_dataset_mb: int = 1024  # a DIMSE message larger than this aborts its association (0: no limit)
    # Listener processes serving host:port (the first accepts and hands each connection to the process serving
    # the fewest). 1: one process. The door's caps above then hold per process.
    listeners: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.listeners <= 64:
            raise ConfigError(f"[node] listeners is 1 to 64 processes, got {self.listeners}")


@dataclass(frozen=True)
class PipelineConfig:
    """Series completion and the per-series job."""

    quiet_seconds: float = 10.0
    poll_seconds: float = 0.5
    workers: int = 1
    write_seg: bool = True  # a DICOM SEG of the findings (IHE AI Results lists it)
    write_harmonized_series: bool = False
    device: str = "auto"  # auto | cpu | cuda
    residual_cache_gb: float = 8.0  # residual maps kept per series (a change of strength reuses them)


@dataclass(frozen=True)
class CommitmentConfig:
    """The [commitment] section: storage commitment reports (N-EVENT-REPORT) the node sends as SCP."""

    report_attempts: int = 20  # then the transaction is ``failed`` (backoff 5 s doubling to 10 min: ~2.5 h)
    backoff_base_s: float = 5.0
    backoff_max_s: float = 600.0
    same_association_grace_s: float = 0.25  # the requester's association still open this long: report on it


@dataclass(frozen=True)
class WebConfig:
    """The HTTP server: console pages, the API, /metrics, /healthz, /readyz (``harmonode serve`` and ``listen``)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default: put a TLS proxy in front, or set tls_* below
    port: int = 8080  # 0: a free port chosen at start (tests)
    tls_cert_file: str = ""  # both set: the server speaks HTTPS itself
    tls_key_file: str = ""
    secret_file: str = ""  # signs session cookies; default <data_dir>/web/secret (made on first start, 0600)
    session_hours: float = 8.0
    secure_cookies: bool = True  # the session cookie is sent over HTTPS only (browsers exempt localhost)
    metrics_token: str = ""  # when set, /metrics needs "Authorization: Bearer <metrics_token>"
    lockout_failures: int = 5  # failed logins of one name within lockout_minutes lock it
    lockout_minutes: float = 15.0
    echo_cache_s: float = 30.0  # /readyz C-ECHOes each destination at most this often
    # a study's "open in viewer" link; {study} becomes its UID (OHIF: "http://host/viewer?StudyInstanceUIDs={study}")
    viewer_url: str = ""


@dataclass(frozen=True)
class StorageConfig:
    """Disk back-pressure: below ``min_free_gb`` free, C-STORE answers 0xA700 until ``resume_free_gb`` is free."""

    min_free_gb: float = 1.0  # 0: never refuse for space
    resume_free_gb: float = 0.0  # accept again above this (0: min_free_gb + 10 %)
    audit_dir: str = ""  # the audit trail (PS3.15 A.5 messages, hash-chained); default <data_dir>/audit
    audit_syslog: str = ""  # also copy each message to this syslog collector: udp://HOST[:PORT] (RFC 5424/5426)

    def __post_init__(self) -> None:
        if self.audit_syslog and not re.fullmatch(r"udp://[^/:\s]+(:\d{1,5})?/?", self.audit_syslog):
            raise ConfigError(f"[storage] audit_syslog is udp://HOST[:PORT], got {self.audit_syslog!r}")


@dataclass(frozen=True)
class LearningConfig:
    """The [learning] section: seed 004's export records of findings, and where they go.

    A record is made for every finding whose reliability is under ``reliability_threshold`` and for every
    finding a radiologist assessed. It goes to ``export_dir`` (a folder, one JSON file per record) and/or
    ``learning_server`` (a URL, HTTP POST with ``learning_token`` as its bearer token); with neither, records
    stay in the node's index.
    """

    export_dir: str = ""
    learning_server: str = ""
    learning_token: str = ""
    reliability_threshold: float = 0.3
    timeout_s: float = 10.0  # one POST to the learning server

    def __post_init__(self) -> None:
        if not 0.0 <= self.reliability_threshold <= 1.0:
            raise ConfigError(f"[learning] reliability_threshold is in [0, 1], got {self.reliability_threshold}")
        if self.learning_server and not self.learning_server.startswith(("http://", "https://")):
            raise ConfigError(f"[learning] learning_server must be an http(s) URL, got {self.learning_server!r}")

    @property
    def export_settings(self) -> ExportSettings:
        """What the export records and their delivery read."""
        return ExportSettings(
            self.export_dir, self.learning_server, self.learning_token, self.reliability_threshold, self.timeout_s
        )


@dataclass(frozen=True)
class ClusterConfig:
    """The [cluster] section: beyond one machine (``node.cluster``).

    With ``broker`` (``amqp://…``, RabbitMQ) and ``database`` (``postgresql://…``) both set, every role and
    command of this config runs against the cluster: the index, the rule registry and the job rows live in
    PostgreSQL (the truth of a job's state), jobs travel as Celery tasks on RabbitMQ, and ``[node] data_dir``
    is the shared file store every host mounts. Empty (the default): the embedded node, SQLite and a folder.
    """

    broker: str = ""
    database: str = ""
    name: str = "harmonode"  # prefix of the broker's queues (several nodes may share one broker)
    relay_seconds: float = 0.5  # how often due jobs are published and lost ones looked for
    lost_after_s: float = 30.0  # a published job still ready after this, its broker queue empty: publish again
    heartbeat_seconds: float = 2.0  # a worker's beat in the database
    stale_after_s: float = 30.0  # a worker silent this long is dead: its running job is taken over

    def __post_init__(self) -> None:
        if bool(self.broker) != bool(self.database):
            raise ConfigError("[cluster] needs both broker (amqp://…) and database (postgresql://…), or neither")
        if self.broker and not self.broker.startswith(("amqp://", "amqps://", "pyamqp://")):
            raise ConfigError(f"[cluster] broker must be a RabbitMQ URL (amqp://…), got {self.broker!r}")
        if self.database and not self.database.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"[cluster] database must be a PostgreSQL URL (postgresql://…), got {self.database!r}")

    @property
    def enabled(self) -> bool:
        """True when this config runs the cluster mode."""
        return bool(self.broker)


QueueConfig = QueueSettings  # the [queue] section: analysis jobs' leases, retries, dead letters


@dataclass(frozen=True)
class DeliveryConfig(QueueSettings):
    """The [delivery] section: how long results keep being sent to a destination that is down.

    The defaults retry for about 16 hours (5 s doubling to 30 min, 40 attempts) before a result is
    dead-lettered (``harmonode resend`` brings it back).
    """

    max_attempts: int = DELIVERY_POLICY.max_attempts
    backoff_base_s: float = DELIVERY_POLICY.backoff_base_s
    backoff_max_s: float = DELIVERY_POLICY.backoff_max_s


@dataclass(frozen=True)
class Destination(Peer):
    """A DICOM peer results are sent to (C-STORE SCU) or that may be named as a C-MOVE destination."""

    send_results: bool = True

    def __post_init__(self) -> None:
        try:
            check_ae_title(self.ae_title, f"destination {self.name!r} ae_title")
            super().__post_init__()
        except ValueError as exc:
            raise ConfigError(str(exc).replace("peer ", "destination ", 1)) from exc


@dataclass(frozen=True)
class Config:
    """The whole configuration of one node."""

    node: NodeConfig = field(default_factory=NodeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)
    web: WebConfig = field(default_factory=WebConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    destinations: tuple[Destination, ...] = ()
    peers: tuple[PeerPermission, ...] = ()  # [[peers]]: who may use which service; none: every admitted caller

    @property
    def data_path(self) -> Path:
        """The data directory as a path (file store, index and queue live there)."""
        return Path(self.node.data_dir)

    @property
    def audit_log(self) -> Path:
        """The audit trail's file (``[storage] audit_dir``, default ``data_dir/audit``)."""
        folder = Path(self.storage.audit_dir) if self.storage.audit_dir else self.data_path / "audit"
        return folder / "audit.log"

    def audit_trail(self) -> AuditTrail:
        """The node's audit trail (``audit_log``), copying to ``[storage] audit_syslog`` when set."""
        forward = SyslogTarget(self.storage.audit_syslog) if self.storage.audit_syslog else None
        return AuditTrail(self.audit_log, self.node.ae_title, forward)

    @property
    def models_path(self) -> Path:
        """The installed-models folder (``harmonode models import|activate``; ``models.bundles``)."""
        return self.data_path / "models"

    @property
    def store_settings(self) -> StoreSettings:
        """How ``storage.store.open_store`` opens this node's data directory."""
        return StoreSettings(
            fsync=self.node.fsync, queue=self.queue, delivery=self.delivery, database=self.cluster.database
        )

    @property
    def has_node_data(self) -> bool:
        """Whether a node has stored anything here: its database in a cluster, its index file otherwise."""
        return self.cluster.enabled or (self.data_path / "index.sqlite").exists()

    @property
    def result_destinations(self) -> tuple[str, ...]:
        """Names of the destinations results are sent to."""
        return tuple(d.name for d in self.destinations if d.send_results)

    def destination_by_ae(self, ae_title: str) -> Destination | None:
        """Return the destination whose AE title is ``ae_title``, or None."""
        for dest in self.destinations:
            if dest.ae_title == ae_title.strip():
                return dest
        return None


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "pipeline": PipelineConfig,
    "queue": QueueConfig,
    "delivery": DeliveryConfig,
    "tls": TlsConfig,
    "commitment": CommitmentConfig,
    "web": WebConfig,
    "storage": StorageConfig,
    "learning": LearningConfig,
    "cluster": ClusterConfig,
}


def _check_ae_title(value: str, what: str) -> None:
    try:
        check_ae_title(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML or environment value to the dataclass field's type."""
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if typ == tuple[str, ...]:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from exc
    return value


def _build_section(cls: type, values: Mapping[str, Any], section: str, env: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name in known:
        env_name = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
        if env_name in env:
            kwargs[name] = _coerce(env[env_name], hints[name], env_name)
        elif name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"[{section}] {name}")
    return cls(**kwargs)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration from a TOML file (or embedded defaults) and apply environment overrides.

    Parameters
    ----------
    path
        TOML file; None uses the embedded defaults only.
    env
        Environment to read ``HARMONODE_…`` overrides from; defaults to ``os.environ``.

    Returns
    -------
    Config
        The frozen configuration.

    Raises
    ------
    ConfigError
        The file is missing or malformed, a key is unknown, or a value has the wrong type.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see deploy/node.example.toml for one)")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    unknown = set(raw) - set(_SECTIONS) - {"destinations", "peers"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)}, destinations, peers")
    sections = {name: _build_section(cls, raw.get(name, {}), name, env) for name, cls in _SECTIONS.items()}
    _check_ae_title(sections["node"].ae_title, "[node] ae_title")
    for ae in sections["node"].allowed_calling_aes:
        _check_ae_title(ae, "[node] allowed_calling_aes")
    dests = []
    for i, d in enumerate(raw.get("destinations", [])):
        try:
            dests.append(
                Destination(
                    name=str(d.get("name", f"destination{i}")),
                    ae_title=str(d["ae_title"]),
                    host=str(d.get("host", "127.0.0.1")),
                    port=int(d["port"]),
                    send_results=bool(d.get("send_results", True)),
                )
            )
        except KeyError as exc:
            raise ConfigError(f"[[destinations]] #{i + 1}: missing key {exc.args[0]!r}") from exc
    return Config(destinations=tuple(dests), peers=_peers(raw.get("peers", []), dests), **sections)


_PEER_KEYS = {"ae_title", "services", "addresses", "move_destinations", "port"}


def _peers(raw: list[Mapping[str, Any]], destinations: list[Destination]) -> tuple[PeerPermission, ...]:
    """The ``[[peers]]`` tables as permissions, each checked (AE titles, services, move destinations)."""
    known_destinations = {d.ae_title for d in destinations}
    peers = []
    for i, p in enumerate(raw):
        where = f"[[peers]] #{i + 1}"
        unknown = set(p) - _PEER_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_PEER_KEYS)}")
        if "ae_title" not in p:
            raise ConfigError(f"{where}: missing key 'ae_title'")
        _check_ae_title(str(p["ae_title"]), f"{where} ae_title")
        moves = tuple(str(a) for a in p.get("move_destinations", []))
        strangers = sorted(set(moves) - known_destinations)
        if strangers:
            raise ConfigError(f"{where}: move_destinations {strangers} are not the AE titles of [[destinations]]")
        try:
            peers.append(
                PeerPermission.of(
                    str(p["ae_title"]),
                    p.get("services", ["echo"]),
                    p.get("addresses", []),
                    moves,
                    int(p.get("port", 0)),
                )
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return tuple(peers)


def with_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """Return a copy of ``config`` with some section fields replaced (tests and the demo use it).

    Example: ``with_overrides(cfg, node={"port": 0}, pipeline={"quiet_seconds": 1})``.
    """
    changes: dict[str, Any] = {}
    for name, values in sections.items():
        if name in ("destinations", "peers"):
            changes[name] = tuple(values)  # type: ignore[arg-type]
        else:
            changes[name] = dataclasses.replace(getattr(config, name), **values)
    return dataclasses.replace(config, **changes)
