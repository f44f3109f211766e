"""Service configuration: one frozen, validated object.

Sources, later ones winning: defaults, a YAML file (``--config`` or ``ELECTRON_CONFIG``),
environment variables ``ELECTRON_<SECTION>__<FIELD>`` (e.g. ``ELECTRON_ENGINE__DTYPE=float32``,
``ELECTRON_ROUTER__PORT=9000``), then CLI flags. Environment variables are read here and
nowhere else.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "ELECTRON_"
DEFAULT_MODEL = "smollm2-135m-instruct"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineConfig(_Frozen):
    # A GGUF file, a Hugging Face directory, or the name of the embedded default model.
    model: str = DEFAULT_MODEL
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    block_size: int = Field(16, ge=1, le=1024)
    # KV pool budget: explicit bytes, or (on GPU, when None) a fraction of free memory.
    kv_cache_bytes: int | None = Field(256 * 1024 * 1024, ge=1)
    gpu_memory_fraction: float = Field(0.85, gt=0, le=0.99)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=16)
    max_model_len: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True
    torch_threads: int | None = Field(None, ge=1)
    seed: int = 0
    # Constrained decoding (docs/structured-output.md): compiled grammars kept (LRU, per spec),
    # and whether the next step's token mask is filled on a helper thread beside the forward.
    grammar_cache_size: int = Field(64, ge=1)
    grammar_overlap: bool = True
    # A request's grammar is compiled on a helper thread (never on the worker's event loop,
    # which serves gRPC and heartbeats); one that takes longer than this is refused (400).
    grammar_compile_timeout_s: float = Field(10.0, gt=0)
    # The longest a step waits for a sequence's next grammar mask; past it that sequence
    # alone fails (the rest of the batch goes on).
    grammar_mask_timeout_s: float = Field(5.0, gt=0)
    # Liveness (docs/engine.md, "Liveness"): a step (or the commands before it) running
    # longer than this, or the engine thread dying, fails the worker: it reports NOT_SERVING,
    # ends every stream with an error and the fleet replaces it.
    stall_timeout_s: float = Field(60.0, gt=0)
    # A request that produced nothing for this long gets a progress message on its stream
    # (queued, and how many requests are ahead of it): routers tell queued from silent.
    progress_interval_s: float = Field(1.0, gt=0)
    # GPU fast path (docs/engine.md, "On a GPU"). Attention: "torch" gathers each sequence's
    # context from the paged cache (every device); "triton" reads the KV blocks in place
    # (CUDA only); "auto" is torch until the Triton path has passed its tests on a GPU.
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    # CUDA graphs for decode-only steps, captured at startup for padded batch sizes up to
    # min(max_num_seqs, cuda_graph_max_batch); prefill and mixed steps run eagerly.
    cuda_graphs: bool = True
    cuda_graph_max_batch: int = Field(256, ge=1)


class RouterConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Prometheus /metrics on a port of its own (on `host`; 0: any free port), so the API port
    # serves only the API; None: /metrics on the API port. The Helm chart sets one.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # Public model id(s) served; requests naming another get 404.
    model_id: str = "electron"
    # Routing (router/routing/policy.py): kv_aware uses the workers' KV events and a cost profile;
    # cache_aware is sglang router's approximate-tree policy, kept as a baseline.
    policy: Literal["kv_aware", "cache_aware", "power_of_two", "least_load",
                    "round_robin"] = "kv_aware"
    # kv_aware: a cost profile JSON (router/routing/cost_model.py; the engine benchmark's result file
    # works too) or a built-in name ("smollm2-cpu", "llama3-8b-h100"); None: smollm2-cpu.
    cost_profile: str | None = None
    # kv_aware: skip a worker whose requests would exceed max(load_cap_min_requests,
    # load_cap * its fair share), so hot prefixes spill to (and replicate on) other workers.
    load_cap: float = Field(2.0, ge=1.0)
    load_cap_min_requests: int = Field(4, ge=1)
    # kv_aware: seconds of score per second of prefill a choice adds (0: pure TTFT-greedy).
    work_weight: float = Field(6.0, ge=0)
    # kv_aware: a request's pending blocks outlive its predicted TTFT by this much.
    pending_slack_s: float = Field(0.5, ge=0)
    # cache_aware, with sglang router's command-line defaults.
    cache_threshold: float = Field(0.3, ge=0, le=1)
    balance_abs_threshold: int = Field(64, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1.0)
    eviction_interval_s: float = Field(120.0, gt=0)
    max_tree_size: int = Field(2**26, ge=1)
    # Failover: this many consecutive failures before the first token keep a worker out of
    # routing for breaker_open_s seconds (then one probe request decides).
    breaker_failures: int = Field(3, ge=1)
    breaker_open_s: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_messages: int = Field(200, ge=1)
    # A non-streamed response is built whole in the router: its n x max_tokens x
    # (1 + top_logprobs) token entries may not exceed this (a stream sends each as it comes).
    max_buffered_tokens: int = Field(1 << 18, ge=1)
    # The longest a large request's validation (its JSON schemas) may take, on a thread.
    validation_timeout_s: float = Field(2.0, gt=0)
    # Seconds of silence from a worker before the first delta (no delta and no progress
    # message: a request queued there is not silent) after which the router fails over.
    first_token_timeout_s: float = Field(30.0, gt=0)
    # A stream that received nothing (no delta, no progress message) for this long after
    # its first delta ends with an error event; the worker's call is cancelled (the worker
    # aborts the request) and the request's slot released.
    stream_stall_timeout_s: float = Field(60.0, gt=0)
    # A stream whose client has read nothing for this long (a write of it waited this long
    # for the client's socket) is aborted: the worker's call is cancelled (the worker aborts
    # the request), the request is billed for the tokens written (status "incomplete"), its
    # slot released and the connection closed.
    client_write_timeout_s: float = Field(30.0, gt=0)
    # Connections (router/api/connections.py): at most this many at once (past it, new
    # requests get 503); a request's head and body must arrive within request_read_timeout_s
    # of the connection's opening or of the request's first byte (slowloris), else the
    # connection is closed; an idle kept-alive connection is closed after
    # keep_alive_timeout_s; a request head (URL and headers) may be at most max_header_bytes.
    max_connections: int = Field(4096, ge=1)
    request_read_timeout_s: float = Field(10.0, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    registry_poll_s: float = Field(0.5, gt=0)
    # Router processes accepting on one port (SO_REUSEPORT), each with its own event loop,
    # prefix index and ledger spool; more than one needs tenancy.redis_url (cluster/
    # router_processes.py, docs/architecture.md "Router processes").
    processes: int = Field(1, ge=1, le=256)
    # A stopping router (SIGTERM, Ctrl-C) is not ready at once, refuses new chat requests
    # (503 shutting_down) and lets the open ones finish for up to this long; then the rest end
    # with an error event, each with its ledger row and its slot released
    # (router/api/drain.py). The Helm chart's terminationGracePeriodSeconds covers it.
    drain_timeout_s: float = Field(30.0, ge=0)


class AuthConfig(_Frozen):
    # On unless turned off explicitly; `electron-serve up` prints a ready-made key.
    enabled: bool = True
    # Keys from the config (no database): they act for the tenant `static_tenant` on the plan
    # `static_plan`. Keys made by `electron-serve tenants` live (hashed) in the database.
    static_keys: tuple[str, ...] = ()
    static_tenant: str = "local"
    static_plan: str = "enterprise"
    # The key of the admin API (/v1/admin/...) and of `GET /v1/usage` over every tenant.
    admin_key: str | None = None
    # Seconds a key found in the database is trusted before it is looked up again (a
    # revocation reaches every replica at once through Redis, or this replica's cache).
    key_cache_ttl_s: float = Field(30.0, ge=0)


class PlanConfig(_Frozen):
    rpm: int = Field(ge=1)                 # requests per minute, per tenant
    concurrency: int = Field(ge=1)         # requests in flight, per tenant
    tpm: int | None = Field(None, ge=1)    # tokens (prompt + completion) per minute
    # Higher is admitted first by the workers' schedulers (and preempted last).
    priority: int = Field(0, ge=0, le=1000)
    max_context: int | None = Field(None, ge=16)
    # Requests waiting in the workers' queues, per worker, beyond which this plan's requests
    # are shed (503 overloaded) instead of queued.
    shed_queue_per_worker: int = Field(16, ge=1)


BUILTIN_PLANS: dict[str, PlanConfig] = {
    "standard": PlanConfig(rpm=10, concurrency=3, priority=0, shed_queue_per_worker=8),
    "enterprise": PlanConfig(rpm=200, concurrency=20, priority=100, shed_queue_per_worker=64),
}


class TenancyConfig(_Frozen):
    # Plans beside (or replacing) the built-in `standard` and `enterprise`.
    plans: dict[str, PlanConfig] = {}
    # Limits shared by every router replica: a Redis URL (None: in process, one replica).
    redis_url: str | None = None
    redis_prefix: str = "electron"  # every Redis key is "<prefix>:…"
    # A router replica holds a concurrency slot by renewing its lease; a dead replica's
    # slots expire after this long.
    slot_lease_s: float = Field(30.0, gt=0)
    # Tenants, keys and the usage ledger: PostgreSQL when set, else the SQLite file.
    database_url: str | None = None
    sqlite_path: str = "~/.local/share/electron-serve/electron.db"
    # Routers apply the schema migrations at start (the embedded default); a deployment that
    # runs `electron-serve migrate` once per release (the Helm chart's hook Job) turns it off.
    migrate_on_start: bool = True
    # PostgreSQL connections per router (a pool shared by auth, usage reads and the ledger),
    # the wait for one (and for a new connection), and the longest one statement may run.
    database_pool_size: int = Field(8, ge=1, le=100)
    database_connect_timeout_s: float = Field(3.0, gt=0)
    database_statement_timeout_s: float = Field(5.0, gt=0)
    # Ledger rows wait here while the database is down (one JSON line each).
    spool_path: str = "~/.local/share/electron-serve/ledger-spool.jsonl"
    ledger_flush_s: float = Field(0.5, gt=0)
    ledger_batch: int = Field(200, ge=1)
    # US dollars per million tokens (docs/api.md, "Price and the ledger"); cached prompt tokens are billed at the cached
    # price instead of the input price.
    price_input: str = "0.40"
    price_cached_input: str = "0.10"
    price_output: str = "1.60"

    def plan(self, name: str) -> PlanConfig | None:
        return self.plans.get(name) or BUILTIN_PLANS.get(name)

    def plan_names(self) -> list[str]:
        return sorted({*BUILTIN_PLANS, *self.plans})


class ClusterConfig(_Frozen):
    ray_address: str | None = None  # None: start a local Ray
    namespace: str = "electron"
    # The token every call to a worker's gRPC port must carry (core/cluster_token.py), the
    # same on a cluster's workers and routers (ELECTRON_CLUSTER__TOKEN; the Helm chart's
    # Secret). `up` makes one per run when it is unset; `worker` and `router` joining a
    # cluster refuse to start without one. Printable ASCII without spaces (gRPC metadata).
    token: str | None = Field(None, min_length=16, max_length=512,
                              pattern=r"^[\x21-\x7e]+$", repr=False)
    # The port each worker's gRPC server listens on (0: any free port, advertised in the
    # registry). A fixed one (one worker per node, as the Helm chart runs them) lets a
    # NetworkPolicy open it to the routers alone.
    worker_port: int = Field(0, ge=0, le=65535)
    workers: int = Field(1, ge=0)
    pool: str = "default"
    num_gpus_per_worker: float = Field(0, ge=0)
    num_cpus_per_worker: float = Field(1, ge=0)
    heartbeat_s: float = Field(0.5, gt=0)
    worker_ttl_s: float = Field(1.5, gt=0)
    # Every call to the registry actor (a worker's register, heartbeat and deregister, a
    # router's poll) gives up after this long: a registry being restarted never stalls them.
    registry_timeout_s: float = Field(2.0, gt=0)
    # Extra Ray resources each worker actor asks for (e.g. {"electron_pool_acme": 1}, which
    # only that pool's KubeRay worker group offers); the autoscaler sets it per pool.
    worker_resources: dict[str, float] = Field(default_factory=dict)
    # `electron-serve worker` gives up (exit 1, StartupFailed) when no worker serves this long
    # after it starts (0: waits for ever): image pulls, GPU nodes and the model load included.
    start_timeout_s: float = Field(0, ge=0)
    # The fleet checks its workers this often and replaces the dead and the failed ones
    # (engine thread died or stalled), whether or not the autoscaler runs; consecutive
    # failed starts wait restart_backoff_s, doubling up to restart_backoff_max_s.
    supervise_interval_s: float = Field(1.0, gt=0)
    # A worker that has answered none of those checks for this long is hung (a frozen
    # process or machine: Ray still reports its actor alive) and is replaced like a dead one;
    # a slower answer than one check allows is no verdict before that.
    worker_hung_after_s: float = Field(20.0, gt=0)
    restart_backoff_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)
    # Written by `electron-serve worker` once its first worker serves: a probe's signal (the
    # Helm chart's controller startup/readiness probe), removed when it stops.
    ready_file: str | None = None
    # The worker fleet one controller (`electron-serve worker`) keeps; the Helm chart names
    # it after the worker generation. Its worker actors are detached and named
    # electron-worker:<fleet>:<worker id> in the namespace, so they outlive a controller
    # that dies, and the next controller of the fleet adopts the live ones (no new actor, no
    # model load). Never run two controllers of one fleet.
    fleet: str = Field("default", min_length=1, max_length=63,
                       pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    # What `electron-serve worker` does with its workers on SIGTERM / Ctrl-C: drain and stop
    # them (false), or leave them serving for the fleet's next controller to adopt (true;
    # `electron-serve down` stops them). A controller killed outright leaves them either way.
    keep_workers_on_exit: bool = False


class PoolConfig(_Frozen):
    """A named worker pool (cluster/autoscaler.py, docs/deploy-kubernetes.md). The shared
    pool is ``cluster.pool``; a tenant pinned to another pool is served only there (and by
    the shared pool when ``fallback_to_shared`` and its own pool has no worker)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    min_workers: int = Field(1, ge=0)
    max_workers: int = Field(1, ge=0)
    fallback_to_shared: bool = False
    # Demand targets per worker: above any of them the pool grows; well below all of them
    # (scale_down_utilization of each) for autoscaler.scale_down_delay_s it shrinks.
    target_ttft_s: float = Field(1.0, gt=0)
    target_waiting_prefill_tokens: int = Field(2048, ge=1)
    target_kv_usage: float = Field(0.85, gt=0, le=1)
    target_requests_per_worker: int = Field(16, ge=1)
    # Extra Ray resources each of its workers asks for (matches its KubeRay worker group).
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _min_le_max(self) -> PoolConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"pool {self.name!r}: min_workers ({self.min_workers}) exceeds "
                             f"max_workers ({self.max_workers})")
        return self


class AutoscalerConfig(_Frozen):
    """Keeps each pool between its min and max from measured demand (cluster/autoscaler.py):
    up fast, down slowly, draining a worker before it stops."""

    enabled: bool = False
    interval_s: float = Field(1.0, gt=0)
    # At most one step up per scale_up_cooldown_s, one step down per scale_down_cooldown_s,
    # and a step down only after demand stayed low for scale_down_delay_s.
    scale_up_cooldown_s: float = Field(10.0, ge=0)
    scale_down_cooldown_s: float = Field(60.0, ge=0)
    scale_down_delay_s: float = Field(120.0, ge=0)
    # Demand below this fraction of every target counts as low.
    scale_down_utilization: float = Field(0.3, gt=0, lt=1)
    # Workers added per step up at most (a burst may need several at once).
    max_step_up: int = Field(2, ge=1)
    # A draining worker gets this long for its running requests before it is stopped.
    drain_timeout_s: float = Field(120.0, gt=0)
    # "ray": also ask Ray's autoscaler for the pool's resources (KubeRay adds GPU pods);
    # "local": only start and stop actors on the nodes there are.
    provider: Literal["local", "ray"] = "local"
    # The pools. The shared pool (cluster.pool), when not listed, is fixed at
    # cluster.workers workers.
    pools: tuple[PoolConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_pools(self) -> AutoscalerConfig:
        names = [p.name for p in self.pools]
        if len(names) != len(set(names)):
            raise ValueError(f"autoscaler.pools: pool names must be unique, got {names}")
        return self


class ObservabilityConfig(_Frozen):
    # Logs: "text" for people, "json" (one object per line, with request and trace ids) for
    # log pipelines. Traces are configured by the standard OTEL_* variables
    # (core/telemetry.py).
    log_format: Literal["text", "json"] = "text"
    # Each worker process serves /metrics here (0: a free port, advertised in the registry).
    worker_metrics_port: int = Field(0, ge=0, le=65535)


class Config(_Frozen):
    engine: EngineConfig = EngineConfig()
    router: RouterConfig = RouterConfig()
    auth: AuthConfig = AuthConfig()
    tenancy: TenancyConfig = TenancyConfig()
    cluster: ClusterConfig = ClusterConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    autoscaler: AutoscalerConfig = AutoscalerConfig()

    @model_validator(mode="after")
    def _progress_within_timeouts(self) -> Config:
        # A queued request's progress messages must come more often than the router's
        # timeouts, or queueing would read as silence.
        every = self.engine.progress_interval_s
        for name in ("first_token_timeout_s", "stream_stall_timeout_s"):
            if getattr(self.router, name) <= every:
                raise ValueError(f"router.{name} ({getattr(self.router, name)}) must exceed "
                                 f"engine.progress_interval_s ({every})")
        return self


class ConfigError(ValueError):
    pass


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_text(annotation: Any) -> bool:
    """A setting whose value is one string (``str``, ``str | None``, a ``Literal`` of strings)."""
    if annotation is str:
        return True
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_text(a) for a in args)
    return False


def _env_value(section: str, field: str, value: str) -> Any:
    """An environment variable's value for ``section.field``. A text setting takes the text as
    it is (YAML would read ``sk-x #y`` as ``sk-x`` and ``~`` as none); others are read as
    YAML, so "8", "true" and "[a, b]" become typed values that pydantic then validates."""
    model = Config.model_fields.get(section)
    target = model.annotation.model_fields.get(field) if model is not None else None
    if not value or (target is not None and _is_text(target.annotation)):
        return value
    return yaml.safe_load(value)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, field = name[len(ENV_PREFIX):].lower().partition("__")
        out.setdefault(section, {})[field] = _env_value(section, field, value)
    return out


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from a YAML file, the environment and explicit overrides."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
    data = _deep_merge(data, _env_overrides(env))
    data = _deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc
