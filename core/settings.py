"""The one settings object.

Every knob of erc-stream lives here, one frozen model per concern (in the spirit of vLLM's
``config/lora.py``): ``Settings().kafka``, ``.redis``, ``.window``, ``.conversation``, ``.batch``, ``.model``,
``.vllm``, ``.store``, ``.data``, ``.services``, ``.delivery``, ``.metrics``, ``.alerts``, ``.export``,
``.tenancy``.
Values come from, in order of precedence: keyword
arguments, environment variables with the ``ERC_`` prefix and ``__`` as the nesting delimiter
(``ERC_KAFKA__BOOTSTRAP_SERVERS=host:9092``, ``ERC_MODEL__BACKEND=null``), then the defaults below.
A renamed setting's old name is still read, with a DeprecationWarning (CHANGELOG.md lists the renames).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: The label sets a route may use (``core.labels.LABEL_SETS``); anything else fails at startup.
LabelSetName = Literal["meld", "emorynlp", "iemocap", "unified"]


class _Section(BaseModel):
    # A string right under a field is its description (shown in the README's configuration reference).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
    #: Old field name -> new one, read with a DeprecationWarning (CHANGELOG.md).
    _renamed: ClassVar[dict[str, str]] = {}

    _section: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _read_renamed(cls, data: Any) -> Any:
        return cls.upgrade(data) if isinstance(data, dict) else data

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with renamed fields under their new names (an explicit new name wins)."""
        if not any(old in data for old in cls._renamed):
            return data
        data = dict(data)
        for old, new in cls._renamed.items():
            if old in data:
                _deprecated(f"{cls._section}.{old}", f"{cls._section}.{new}")
                data.setdefault(new, data.pop(old))
        return data


def _deprecated(old: str, new: str) -> None:
    env = lambda name: "ERC_" + name.upper().replace(".", "__")  # noqa: E731
    warnings.warn(f"setting {old} ({env(old)}) is now {new} ({env(new)}); see CHANGELOG.md",
                  DeprecationWarning, stacklevel=2)


class KafkaSettings(_Section):
    """Broker connection, topics and consumer-group behaviour."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Broker(s), comma-separated host:port."""
    input_topic: str = "chat.messages"
    """Chat messages in (keyed by conversation id)."""
    output_topic: str = "chat.emotions"
    """Emotion events out."""
    dlq_topic: str = "chat.dlq"
    """Dead letters: records that could not become events, with why."""
    alerts_topic: str = Field(
        "chat.alerts", description="Alerts raised by the rules in `alerts`, keyed by conversation or tenant."
    )
    partitions: int = Field(4, ge=1, description="Partitions created for each topic by `services up`.")
    group_id: str = "erc-stream"
    """The consumers' group."""
    client_id: str = "erc-stream"
    """Client id prefix of every Kafka client."""
    # tansu runs a join in session_timeout/2; 6 s / 1 s keeps rebalances short on every broker.
    session_timeout_ms: int = 6000
    """A member that sends no heartbeat this long leaves the group."""
    heartbeat_interval_ms: int = 1000
    """How often a member heartbeats."""
    max_poll_interval_ms: int = 300_000
    """Longest time between polls before the member is evicted."""
    request_timeout_ms: int = 30_000
    """Kafka request timeout."""
    max_message_bytes: int = Field(1_048_576, description="Input records larger than this are dead-lettered.")
    max_decompressed_batch_bytes: int = Field(
        67_108_864, ge=1_048_576,
        description="A compressed input record batch (gzip, snappy, lz4, zstd) that would inflate past this is "
        "not decompressed: it becomes one dead letter (`undecodable_batch`) and the consumer goes past it. Keep it "
        "above the largest batch a producer sends uncompressed (Apache Kafka's default limit is 1 MiB per batch).",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How clients talk to the broker."""
    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 ... (SASL_* protocols)."""
    sasl_username: str | None = None
    """SASL user."""
    sasl_password: SecretStr | None = None
    """SASL password; never logged."""
    ssl_cafile: str | None = None
    """CA bundle that signed the broker's certificate."""
    ssl_certfile: str | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_keyfile: str | None = Field(None, description="Client private key (mutual TLS).")
    ssl_password: SecretStr | None = Field(None, description="Password of the client private key.")
    ssl_check_hostname: bool = True
    """Check the broker certificate's host name."""
    producer_linger_ms: int = Field(
        20, ge=0, description="The consumer's producer waits up to this long to fill a record batch before sending "
        "it. Each stream batch ends with a flush, which sends at once, so this only groups the batch's outputs into "
        "fewer, larger requests while they are being produced (kafka-python `linger_ms`).",
    )
    producer_batch_bytes: int = Field(
        262_144, ge=1024, description="Bytes of one producer record batch per partition (kafka-python `batch_size`; "
        "its default, 16 KiB, holds ~25 events and splits a stream batch into many requests).",
    )
    producer_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of the consumer's outputs. Costs the consumer's CPU; worth it only when the "
        "network to the broker is the bottleneck (snappy/lz4/zstd need their Python packages).",
    )
    producer_idempotence: bool = Field(
        True, description="Idempotent production: a retried send is written once and in order (the producer keeps "
        "at most 5 requests in flight per connection, as the protocol requires). Turn off only for a broker "
        "without idempotence (Apache Kafka needs the IDEMPOTENT_WRITE permission before 2.8).",
    )
    dlq_max_original_bytes: int = Field(
        524_288, ge=0,
        description="A dead letter keeps at most this many bytes of the original record (base64 grows it by a "
        "third; Apache Kafka's default message.max.bytes is 1 MB). Longer originals are cut and flagged.",
    )

    def client_options(self) -> dict[str, object]:
        """Connection options shared by every kafka-python client (producer, consumer, admin)."""
        opts: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.ssl_cafile:
            opts["ssl_cafile"] = self.ssl_cafile
        if self.security_protocol in ("SSL", "SASL_SSL"):
            opts["ssl_check_hostname"] = self.ssl_check_hostname
            if self.ssl_certfile:
                opts["ssl_certfile"] = self.ssl_certfile
            if self.ssl_keyfile:
                opts["ssl_keyfile"] = self.ssl_keyfile
            if self.ssl_password:
                opts["ssl_password"] = self.ssl_password.get_secret_value()
        return opts


class RedisSettings(_Section):
    """Conversation state."""

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """Redis URL (redis:// or rediss://); never logged."""
    key_prefix: str = "erc"
    """Prefix of every key erc-stream writes."""
    socket_timeout_s: float = 5.0
    """Connect and command timeout."""
    username: str | None = Field(None, description="ACL user (overrides the URL's).")
    password: SecretStr | None = Field(None, description="Password (overrides the URL's); never logged.")
    ssl_ca_certs: str | None = Field(None, description="CA bundle for rediss:// URLs.")
    ssl_certfile: str | None = None
    """Client certificate (mutual TLS)."""
    ssl_keyfile: str | None = None
    """Client private key (mutual TLS)."""
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """Verification of the server certificate (rediss://)."""
    cluster: bool = Field(
        False, description="`url` is a seed node of a Redis Cluster: the client discovers the other nodes and routes "
        "each conversation's keys (one hash slot per conversation, `{conversation_id}` tags) to their primary. The "
        "URL's database must be 0. Off: one standalone Redis.",
    )

    def client_options(self) -> dict[str, object]:
        """Keyword arguments for ``redis.Redis.from_url(url, **options)`` (TLS applies to rediss:// URLs)."""
        opts: dict[str, object] = {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_timeout_s,
        }
        if self.username:
            opts["username"] = self.username
        if self.password:
            opts["password"] = self.password.get_secret_value()
        if self.url.get_secret_value().startswith("rediss://"):
            opts["ssl_cert_reqs"] = self.ssl_cert_reqs
            for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name):
                    opts[name] = getattr(self, name)
        return opts


class WindowSettings(_Section):
    """The historical window (InstructERC's w): the turns a prompt holds, and how each turn's text is cut."""

    size: int = Field(12, ge=1, description="Turns in a prompt, the target included (w in the paper): the fewest a "
                      "window holds once the conversation has that many.")
    hop: int = Field(
        12, ge=1, description="How far a window's first turn jumps when it moves: a window holds size to size + hop - 1 "
        "turns, so a conversation's consecutive prompts share their history and the prefix cache is rebuilt once per "
        "hop turns (1: a sliding window, rebuilt every turn). See docs/benchmarks.md for how 12 was chosen.",
    )

    @property
    def span(self) -> int:
        """The most turns a window holds (what the conversation store hands the prompt builder)."""
        return self.size + self.hop - 1
    max_turn_chars: int = Field(2_000, ge=16, description="A turn's text is cut to this many characters before prompting.")
    max_turn_tokens: int = Field(
        256, ge=8, description="A turn's text is cut to this many tokens (the model's tokenizer) before it is stored "
        "in its window: the token budget of one message, however long its text.",
    )


class ConversationSettings(_Section):
    """Each conversation's state in Redis: its stored turns (the history windows are read from them)."""

    retain_turns: int = Field(
        24, ge=1, description="Turns kept per conversation in Redis (>= window.size + window.hop - 1, so a replayed "
        "turn still finds its history).",
    )
    ttl_s: int = Field(86_400, ge=1, description="A conversation's state expires this long after its last turn.")
    max_speakers: int = Field(
        100, ge=1, description="Speaker numbers (`Speaker_<k>`) a conversation keeps in Redis (never fewer than "
        "`retain_turns`). Past this, the speakers without a retained turn are forgotten, and one who speaks again "
        "gets a new number; the retained turns' speakers keep theirs. Bounds the speaker hash of a thread with "
        "thousands of commenters: 1.9 KB at 100 numbers (docs/capacity.md).",
    )
    decode_cache_turns: int = Field(
        65_536, ge=0, description="Stored turns each consumer process keeps decoded (an LRU cache keyed by the "
        "stored bytes; consecutive windows share all but one turn). Each entry holds its turn's text: ~840 B for "
        "MELD-like texts, ~53 MiB at the default (docs/capacity.md). 0: no cache.",
    )


class BatchSettings(_Section):
    """Two batch sizes: the stream batch (records taken from Kafka and committed together) and, inside it, the
    micro-batch (messages scored in one backend call)."""

    _section = "batch"
    _renamed = {"max_size": "micro_batch_size", "max_records": "stream_batch_size"}

    micro_batch_size: int = Field(16, ge=1)
    """Most messages in one micro-batch (one backend call)."""
    max_wait_ms: int = Field(250, ge=0, description="How long a stream batch waits to fill after its first record.")
    stream_batch_size: int | None = Field(
        None, ge=1, description="Most records in one stream batch: one Kafka poll, one pipelined Redis round-trip "
        "per stage, one producer flush and one offset commit; inference runs over it in micro-batches of "
        "`micro_batch_size`. Unset = `micro_batch_size`, right for a model on a CPU, where a batch's inference time is its latency and must stay "
        "under `metrics.liveness_timeout_s` and `kafka.max_poll_interval_ms`. With a fast backend (null, vLLM on a "
        "GPU) raise it, e.g. 500: the per-batch round-trips are then shared by many messages (docs/benchmarks.md).",
    )

    @property
    def stream_records(self) -> int:
        """Records one stream batch takes: ``stream_batch_size``, or ``micro_batch_size`` when unset."""
        return self.stream_batch_size or self.micro_batch_size


class TenantModel(_Section):
    """One tenant's route: the adapter and label set its messages are labelled with."""

    adapter: str | None = None
    """A peft LoRA adapter (a name in the store or a directory), 'none' for zero-shot, or unset to follow the
    registry's active adapter for this route's label set."""
    label_set: LabelSetName
    """The labels this tenant's events carry."""


class ModelSettings(_Section):
    """Which model labels the stream, and how."""

    backend: Literal["hf", "vllm", "null"] = "hf"
    """hf: transformers + peft; vllm: vLLM (multi-LoRA); null: no inference, uniform probabilities."""
    base: str = Field(
        "smollm2-135m",
        description="A base model name in the store, or a path to any local HF-format model directory.",
    )
    adapter: str | None = Field(
        None,
        description="A peft LoRA adapter (a name in the store or a directory), 'none' for zero-shot, "
        "or unset to follow the registry's active adapter for the label set (switched between batches).",
    )
    adapter_poll_s: float = Field(2.0, gt=0, description="How often a consumer checks the registry for a promotion.")
    label_set: LabelSetName = "meld"
    """The labels events carry."""
    tenants: dict[str, TenantModel] = Field(
        {}, description="Per-tenant routes, JSON: `{\"acme\": {\"adapter\": \"unified-lora\", \"label_set\": "
        "\"unified\"}}` (adapter unset = the registry's active one for that label set). One consumer and one "
        "backend serve them all; messages of other tenants, or of none, use `adapter` and `label_set`.",
    )
    device: str = "cpu"
    """torch device of the hf backend (cpu, cuda, cuda:1 ...)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype (hf backend). 'auto': bfloat16 where the machine runs it natively (a CUDA GPU, a CPU with
    AVX-512 BF16 or AMX; half the memory for weights and cached keys, up to 2.8x the float32 throughput with the
    adapter merged; dev weighted F1 of the shipped adapters within 0.5), else float32 (bf16 is emulated and > 10x
    slower without them). float32: the reference numerics."""
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's default.")
    prefix_cache_mb: int = Field(
        512, ge=0, description="hf backend: MiB of keys and values kept from scored prompts, so a conversation's next "
        "turn computes only the tokens after the prefix it shares with the previous one (0 = off).",
    )
    merge_adapter: bool = Field(
        False, description="hf backend: fold the adapter in use into the weights (no LoRA matmuls per token). "
        "A batch for another adapter, or none, unmerges and merges again: for one-adapter consumers.",
    )
    packed_forward: bool = Field(
        True, description="hf backend: run a micro-batch as one sequence of its prompts' new tokens (no padding; "
        "attention row by row against each prompt's cached prefix). Llama-family models; others always take padded "
        "forward passes, as they do with false.",
    )
    max_prompt_tokens: int = Field(
        384, ge=64, description="History is cut from the left past this; instruction, label statement and target stay."
    )
    demo_position: Literal["after_history", "after_instruction"] = Field(
        "after_history",
        description="Where the retrieved demonstration goes. After the history keeps each conversation's prefix stable.",
    )
    layout: Literal["instructerc", "stream"] = Field(
        "instructerc",
        description="The prompt layout of the base model without an adapter, and of training runs. instructerc: the "
        "paper's (the label statement quotes the target after the history); stream: instruction and label statement "
        "first, each turn's line ends with a marker at which its label is read, so a conversation's next prompt is "
        "the previous one plus one line. An adapter is always served with the layout it was trained with.",
    )

    def for_tenant(self, tenant: str | None) -> "ModelSettings":
        """This section as ``tenant``'s route sees it: the tenant's adapter and label set, else the default route's."""
        route = self.tenants.get(tenant) if tenant is not None else None
        if route is None:
            return self
        return self.model_copy(update={"adapter": route.adapter, "label_set": route.label_set})


class VLLMSettings(_Section):
    """The vLLM engine behind ``model.backend = "vllm"`` (one engine, several LoRA adapters per batch)."""

    max_loras: int = Field(2, ge=1, description="Adapters one engine step can mix (the LoRA slots held in memory).")
    max_lora_rank: int = Field(16, ge=1, description="The largest adapter rank the engine accepts.")
    max_model_len: int = Field(1024, ge=64, description="Prompt plus answer tokens; longer prompts are refused.")
    kv_cache_gib: int = Field(
        2, ge=1, description="CPU only: KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE when that is unset)."
    )
    enforce_eager: bool = Field(True, description="No graph capture / compilation: a faster start, slower steps.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of a shared prompt prefix (the instruction, a conversation's history)."
    )
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU only: the share of GPU memory vLLM takes.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 where it is native (a GPU, a CPU with AVX-512 BF16 or AMX), "
        "else float32 (bf16 is > 10x slower on a CPU without them)."
    )


class StoreSettings(_Section):
    """Where converted base models and trained adapters live."""

    dir: Path = Path.home() / ".cache" / "erc-stream" / "store"
    """Converted base models, trained adapters and the registry."""


class DataSettings(_Section):
    """Where the MELD / EmoryNLP / IEMOCAP files are read from (never copied into the project)."""

    dir: Path = PROJECT_ROOT.parent / "shared" / "data"
    """Folder holding meld/ and emorynlp/ (and iemocap/), read in place."""


class TenancySettings(_Section):
    """Where a message's tenant comes from. The tenant picks the adapter and label set, the alert settings, the
    state's scope in Redis and who sees the events: in a multi-tenant deployment it must come from a source the
    tenant cannot forge (README, "Tenants")."""

    source: Literal["message", "topic", "header"] = Field(
        "message",
        description="message: the message's own `tenant` field (one producer, or producers that are trusted). topic: "
        "the input topic's name (`topic_pattern`; one topic per tenant, each tenant's producer allowed to write only "
        "its topic by the broker's ACLs; the consumer subscribes to every topic the pattern matches). header: the "
        "record header `header`, set by a trusted gateway. With topic or header, a message whose own `tenant` "
        "disagrees is dead-lettered (`tenant_mismatch`), one without a tenant gets the trusted one, and a record "
        "without the header is dead-lettered (`tenant_missing`).",
    )
    topic_pattern: str = Field(
        r"^chat\.messages\.(?P<tenant>[A-Za-z0-9_-]{1,64})$",
        description="source=topic: a regular expression the input topics' names match in full, with a group named "
        "`tenant` (the output, alert and dead-letter topics must not match it).",
    )
    header: str = Field("x-erc-tenant", min_length=1, description="source=header: the record header holding the "
                        "tenant (UTF-8), set by a gateway that authenticated the producer.")

    @model_validator(mode="after")
    def _pattern_names_a_tenant(self) -> "TenancySettings":
        try:
            pattern = re.compile(self.topic_pattern)
        except re.error as e:
            raise ValueError(f"tenancy.topic_pattern is not a regular expression: {e}") from e
        if "tenant" not in pattern.groupindex:
            raise ValueError("tenancy.topic_pattern needs a group named tenant: (?P<tenant>...)")
        return self


class DeliverySettings(_Section):
    """How events, dead letters and consumed offsets reach Kafka (see README, "Operations")."""

    mode: Literal["at_least_once", "transactional"] = Field(
        "at_least_once",
        description="at_least_once: produce, flush, then commit offsets (any Kafka-protocol broker; readers "
        "dedupe by event_id). transactional: outputs and offsets in one Kafka transaction (Apache Kafka).",
    )
    transactional_id_prefix: str = Field("erc-stream", description="transactional.id = '<prefix>-<worker_id>'.")
    worker_id: str | None = Field(
        None,
        description="This worker's stable identity (e.g. a StatefulSet pod name): a restarted worker with the "
        "same id fences its predecessor. Default: the host name.",
    )
    commit_watchdog_s: float = Field(
        30.0, gt=0, description="Transactional: a commit (or abort) that takes longer than this is fatal: the worker "
        "exits and its restart aborts the open transaction.",
    )
    commit_interval_ms: int = Field(
        0, ge=0, description="At-least-once: commit offsets at most this often (0 = after every batch). Pending "
        "offsets are always committed on partition revoke and on shutdown.",
    )
    redis_backoff_max_s: float = Field(10.0, gt=0, description="Longest wait between Redis retries during an outage.")
    kafka_backoff_max_s: float = Field(
        10.0, gt=0, description="Longest wait between retries of a batch whose outputs could not be written.")
    backend_backoff_max_s: float = Field(
        10.0, gt=0, description="Longest wait between probes of a model backend that is down (consumption paused).")
    backend_down_exit_s: float = Field(
        600.0, ge=0, description="A model backend down this long makes the worker exit (code 4), so its "
        "orchestrator restarts it with a fresh engine: an in-process engine (vLLM, a lost CUDA context) does not "
        "come back by itself. Nothing is lost: the paused batch was not committed. 0 = wait forever.")


class MetricsSettings(_Section):
    """The consumer's HTTP endpoint: Prometheus metrics, liveness and readiness."""

    enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz from the consumer.")
    host: str = Field("127.0.0.1", description="Address the endpoint listens on (0.0.0.0 for a scraper on another "
                      "host or container: then set a token).")
    token: SecretStr | None = Field(None, description="When set, /metrics answers only requests with the header "
                                    "`Authorization: Bearer <token>` (Prometheus: `authorization.credentials`); the "
                                    "probes /healthz and /readyz stay open (they tell nothing but up or down).")
    port: int = Field(9400, ge=0, le=65535, description="Port of the endpoint (0 = any free port, logged at start).")
    liveness_timeout_s: float = Field(
        120.0, gt=0, description="/healthz fails when the main loop has not completed an iteration for this long "
        "(keep it above the slowest batch's inference time).",
    )
    lag_interval_s: float = Field(
        2.0, gt=0, description="While idle, how often the per-partition consumer lag is recomputed (and after each batch).",
    )


#: Negative emotions of each label set (what a streak and a tenant's negative rate count).
DEFAULT_NEGATIVE_LABELS: dict[str, tuple[str, ...]] = {
    "meld": ("angry", "disgust", "fear", "sad"),
    "emorynlp": ("Mad", "Sad", "Scared"),
    "iemocap": ("angry", "frustrated", "sad"),
    "unified": ("mad", "disgust", "fear", "sad"),
}
#: Anger, the target of the shift rule.
DEFAULT_ANGER_LABELS: dict[str, tuple[str, ...]] = {
    "meld": ("angry",), "emorynlp": ("Mad",), "iemocap": ("angry",), "unified": ("mad",),
}
#: Neutral or positive emotions, the origin of the shift rule.
DEFAULT_CALM_LABELS: dict[str, tuple[str, ...]] = {
    "meld": ("neutral", "joyful"),
    "emorynlp": ("Neutral", "Joyful", "Peaceful", "Powerful"),
    "iemocap": ("neutral", "happy", "excited"),
    "unified": ("neutral", "joyful", "excited", "peaceful", "powerful"),
}


class AlertSettings(_Section):
    """Alert rules evaluated in the stream (state in Redis); alerts go to `kafka.alerts_topic`."""

    enabled: bool = Field(True, description="Evaluate the rules and emit alerts.")
    streak_length: int = Field(
        3, ge=0, description="Alert when this many consecutive turns of a conversation are negative (0 = rule off). "
        "Fires once per streak, when it first reaches this length.",
    )
    shift: bool = Field(
        True, description="Alert when a speaker's turn is anger and that speaker's previous turn was neutral or positive.",
    )
    shift_lookback: int = Field(
        10, ge=1, description="How many turns back the shift rule looks for the speaker's previous turn.",
    )
    tenant_window_s: float = Field(300.0, gt=0, description="Sliding window of the tenant rule, in seconds of `sent_at`.")
    tenant_threshold: float = Field(
        0.5, ge=0, le=1, description="Alert when a tenant's share of negative events in the window is above this "
        "(1 = rule off).",
    )
    tenant_min_count: int = Field(20, ge=1, description="The tenant rule needs at least this many events in the window.")
    tenant_cooldown_s: float = Field(
        300.0, ge=0, description="After a tenant alert, the rule stays quiet for that tenant this long (seconds of `sent_at`).",
    )
    tenant_window_max_events: int = Field(
        10_000, ge=1, description="Most events one tenant's window holds in Redis (one key per tenant): a tenant "
        "sending more than this in `tenant_window_s` is judged on its most recent N events (the oldest leave first), "
        "so its keys stay bounded (~300 B an event, 3 MB at the default). Must be >= `tenant_min_count`; one value "
        "for every tenant (not in `tenants` overrides).",
    )
    negative_labels: dict[str, tuple[str, ...]] = Field(
        DEFAULT_NEGATIVE_LABELS, description="Negative labels per label set (JSON in the environment).",
    )
    anger_labels: dict[str, tuple[str, ...]] = Field(DEFAULT_ANGER_LABELS, description="Anger labels per label set.")
    calm_labels: dict[str, tuple[str, ...]] = Field(
        DEFAULT_CALM_LABELS, description="Neutral and positive labels per label set (where a shift starts).",
    )
    evidence_max: int = Field(20, ge=1, description="At most this many messages are listed in an alert's evidence.")
    dedupe_ttl_s: int = Field(
        7 * 86_400, ge=1, description="How long an emitted alert's id is remembered, so a redelivered message does not "
        "raise it again.",
    )
    streak_roles: tuple[str, ...] = Field(
        (), description="`negative_streak` counts only turns of these roles (e.g. `[\"customer\"]`), looking through "
        "the other roles' turns between them; empty: every turn.",
    )
    shift_roles: tuple[str, ...] = Field(
        (), description="`shift_to_anger` only for speakers of these roles (e.g. `[\"customer\"]`); empty: every speaker.",
    )
    tenants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-tenant overrides of any setting of this section, e.g. "
        "`{\"acme\": {\"streak_length\": 4, \"streak_roles\": [\"customer\"]}}`; validated at start.",
    )

    @model_validator(mode="after")
    def _check_tenants(self) -> "AlertSettings":
        for tenant, override in self.tenants.items():
            if "tenants" in override:
                raise ValueError(f"alerts.tenants.{tenant}: an override cannot hold tenants of its own")
            self.for_tenant(tenant)  # an invalid override fails here, at start, not on the tenant's first event
        return self

    def for_tenant(self, tenant: str | None) -> "AlertSettings":
        """This section as ``tenant``'s events see it: its overrides on top of the defaults."""
        override = self.tenants.get(tenant) if tenant is not None else None
        if not override:
            return self
        return AlertSettings.model_validate({**self.model_dump(exclude={"tenants"}), **override})


class DashboardToken(BaseModel):
    """A dashboard token that sees only some tenants (``dashboard.tokens``): issued to one tenant's supervisors."""

    # A validation error must not print the secret it was given.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    token: SecretStr = Field(description="The secret a request carries, as the admin token is carried (16 characters "
                             "or more).")
    tenants: tuple[str, ...] = Field(min_length=1, description="The tenants whose conversations, alerts and rates it "
                                     "sees (events without a tenant are for the admin token only).")

    @model_validator(mode="after")
    def _long_enough(self) -> "DashboardToken":
        if len(self.token.get_secret_value()) < 16:
            raise ValueError("dashboard.tokens: a token's secret needs 16 characters or more")
        return self


class DashboardSettings(_Section):
    """`erc-stream dashboard`: the live view for supervisors (conversations by risk, timelines, alerts, health)."""

    model_config = ConfigDict(hide_input_in_errors=True)  # merged with _Section's: errors never echo the tokens

    host: str = Field("127.0.0.1", description="Address the web page listens on.")
    port: int = Field(8090, ge=0, le=65535, description="Its port (0 = any free port, printed at start).")
    token: SecretStr | None = Field(None, description="Bearer token every request must carry (header, or `?token=` "
                                    "once: the page then keeps it in a cookie). Unset: a random one is made at start "
                                    "and printed with the URL.")
    auth: bool = Field(True, description="false turns authentication off (only for a page bound to 127.0.0.1 on a "
                       "single-user machine).")
    show_texts: bool = Field(False, description="Show message texts on the timelines (privacy: off shows labels, "
                             "roles and probabilities only).")
    group_id: str = Field("erc-stream-dashboard", description="Consumer group of the page's reader of the emotion and "
                          "alert topics (it starts at the newest records).")
    max_conversations: int = Field(2_000, ge=1, description="Conversations kept in memory (the least recent leave).")
    timeline_turns: int = Field(200, ge=1, description="Turns of a conversation's timeline kept.")
    recent_turns: int = Field(10, ge=1, description="A conversation's risk: its negative share over its last N turns, "
                              "after its current negative streak.")
    tokens: dict[str, DashboardToken] = Field(
        default_factory=dict, description="Tenant-scoped tokens, JSON: name -> `{\"token\": \"<secret>\", "
        "\"tenants\": [\"acme\"]}`. A page opened with one sees only those tenants' conversations, alerts, rates and "
        "counters (another tenant's conversation answers 404). `token` stays the admin token, which sees every tenant.",
    )
    cookie_max_age_s: int = Field(43_200, ge=60, description="How long the page's login cookie lasts (then open "
                                  "`/?token=` again).")
    cookie_secure: bool = Field(False, description="Mark the cookie `Secure` also when the page is reached over plain "
                                "HTTP (a proxy that terminates TLS without sending `X-Forwarded-Proto`); over HTTPS it "
                                "always is.")
    text_chars: int = Field(280, ge=1, description="Message texts are kept and shown cut to this many characters "
                            "(with show_texts).")
    max_tenants: int = Field(500, ge=1, description="Tenants whose rates and counters are kept in memory (the least "
                             "recently active leave).")
    max_streams: int = Field(32, ge=1, description="Live pages (event streams) served at a time; one more is answered "
                             "503 until one closes.")

    @model_validator(mode="after")
    def _tokens_differ(self) -> "DashboardSettings":
        secrets = [t.token.get_secret_value() for t in self.tokens.values()]
        if self.token is not None:
            secrets.append(self.token.get_secret_value())
        if len(set(secrets)) != len(secrets):
            raise ValueError("dashboard.tokens: every token needs its own secret (and none may be dashboard.token)")
        return self


class _Masked:
    """An invalid target input, kept out of error messages: pydantic prints a bad input's repr, and that message
    reaches a terminal or a log, where a webhook URL (Slack's carries its credential in the path) or a token must
    not. Only the input's type is kept (the value fails validation anyway)."""

    __slots__ = ("kind",)

    def __init__(self, value: object) -> None:
        self.kind = type(value).__name__

    def __repr__(self) -> str:
        return f"<{self.kind}, masked>"


def _mask(value: Any) -> Any:
    if value is None or isinstance(value, (SecretStr, _Masked)):
        return value
    return SecretStr(value) if isinstance(value, str) else _Masked(value)


class NotifyTarget(BaseModel):
    """One webhook ``erc-stream notify`` delivers alerts to. ``url`` and ``token`` are secrets (a Slack webhook URL
    is its own credential): masked in ``erc-stream config``, in validation errors and in logs, which name a target
    by its ``name``."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
    #: Fields an error may show as given; every other value of a target (url, token, a misspelt key) is masked first.
    _PUBLIC: ClassVar[frozenset[str]] = frozenset({"name", "kind", "tenants", "rules"})

    name: str = Field(min_length=1, description="Identifies the target in dedupe state, metrics, dead letters and "
                      "logs (unique among the targets).")
    url: SecretStr = Field(description="Where alerts are POSTed (http or https); a secret, never printed.")
    kind: Literal["json", "slack"] = Field("json", description="json: the alert record; slack: `{\"text\": ...}`.")
    tenants: tuple[str, ...] | None = Field(None, description="Only these tenants' alerts (None: every tenant).")
    rules: tuple[str, ...] | None = Field(None, description="Only these rules' alerts (None: every rule).")
    token: SecretStr | None = Field(None, description="Sent as `Authorization: Bearer <token>` when set.")

    @model_validator(mode="before")
    @classmethod
    def _mask_inputs(cls, data: Any) -> Any:
        """Secrets wrapped before validation: whatever fails, its error prints ``SecretStr('**********')``."""
        if isinstance(data, (BaseModel, _Masked)):
            return data
        if not isinstance(data, dict):
            return _Masked(data)
        return {key: value if key in cls._PUBLIC else _mask(value) for key, value in data.items()}

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: SecretStr) -> SecretStr:
        if not url.get_secret_value().lower().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url


class NotifySettings(_Section):
    """`erc-stream notify`: alerts from the alerts topic to people, through webhooks."""

    targets: tuple[NotifyTarget, ...] = Field((), description="JSON list of targets, e.g. `[{\"name\": \"sup\", "
                                              "\"url\": \"https://hooks.example/x\", \"kind\": \"slack\", "
                                              "\"tenants\": [\"acme\"]}]`. URLs and tokens are secrets: masked "
                                              "in `erc-stream config` and in errors.")
    group_id: str = Field("erc-stream-notify", description="The notifier's consumer group (its offsets are committed "
                          "up to the first alert not yet delivered, folded into a delivered summary, or "
                          "dead-lettered for every target it routes to).")
    group_wait_s: float = Field(1.0, ge=0, description="How long the first alert of a quiet (tenant, rule) group "
                                "waits for others before it is sent (alone, or as a summary of what came meanwhile).")
    group_interval_s: float = Field(60.0, ge=0, description="After a group's notification, its further alerts wait "
                                    "until this long has passed and go out as one summary: a storm makes one "
                                    "notification per (tenant, rule) and interval, not one per alert. 0: no "
                                    "grouping, every alert on its own.")
    summary_max_alerts: int = Field(500, ge=2, description="Most alerts one summary folds (it lists all their ids); a "
                                    "group holding this many is sent at once, without waiting for its interval.")
    summary_list: int = Field(10, ge=0, description="Alerts a summary shows in detail (id, conversation, summary "
                              "line); it counts the others.")
    backlog_max: int = Field(10_000, ge=1, description="Alerts one target may hold undelivered (grouped, queued or "
                             "being retried). A full target sends its groups at once; while it is delivering, the "
                             "notifier waits for room (about one request); while its last try failed, an alert for "
                             "it is dead-lettered for that target at once (`backlog full`), so a dead target "
                             "neither holds up the others nor grows memory.")
    attempts: int = Field(6, ge=1, description="Tries per notification and target before its alerts are "
                          "dead-lettered (a 4xx other than 408/425/429 is final at once).")
    backoff_s: float = Field(0.5, gt=0, description="First retry delay; doubles per try, up to backoff_max_s.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest delay between two tries; a `Retry-After` (seconds "
                                 "or HTTP date) on 429/503 is honoured up to this.")
    timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of one delivery (connect, send, each read; an "
                             "error body is read for at most this long and 4 KiB).")
    sent_ttl_s: int = Field(7 * 86_400, ge=1, description="How long an (alert, target), or a summary, is remembered "
                            "as delivered.")
    start_lookback_s: float = Field(3_600.0, gt=0, description="A notifier group with no committed offset yet starts "
                                    "this far back on the alerts topic (a new deployment does not page people "
                                    "about last week's alerts); afterwards it resumes from its offsets.")
    metrics_port: int = Field(9402, ge=0, le=65535, description="Port of the notifier's /metrics (0 = any free port).")

    @field_validator("targets", mode="wrap")
    @classmethod
    def _targets(cls, targets: Any, handler: Any) -> tuple[NotifyTarget, ...]:
        """Targets validated from masked input (an error prints it), with unique names (each names its own dedupe
        state, queue and metrics)."""
        masked = ([NotifyTarget._mask_inputs(t) for t in targets] if isinstance(targets, (list, tuple))
                  else _Masked(targets))
        valid = handler(masked)
        names = [t.name for t in valid]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValidationError.from_exception_data("targets", [{
                "type": PydanticCustomError("unique_names", "target names must be unique: {names}",
                                            {"names": ", ".join(twice)}),
                "loc": (), "input": masked}])
        return valid


class ExportSettings(_Section):
    """`erc-stream export` to Parquet or CSV: a resumable sink for BI tools."""

    group_id: str = Field("erc-stream-export", description="The exporter's consumer group (its committed offsets are "
                          "where a next run resumes).")
    flush_events: int = Field(5_000, ge=1, description="Write files and commit offsets after this many events.")
    flush_interval_s: float = Field(10.0, gt=0, description="... or after this long, whichever comes first.")
    dedupe_ids: int = Field(
        1_000_000, ge=1, description="Event ids a reader of the output topics remembers to drop redelivered copies "
        "(the exporter, `erc-stream export`, the report): the least recent are forgotten first. ~165 B an id in "
        "memory, ~157 MiB at the default (docs/capacity.md); keep it above the events a redelivery can repeat (a "
        "few stream batches of every partition).",
    )


class ServicesSettings(_Section):
    """Local services started by ``erc-stream services up``."""

    run_dir: Path = Path.home() / ".cache" / "erc-stream" / "run"
    """Pid files and logs of the services erc-stream started."""
    start_timeout_s: float = 20.0
    """How long `services up` waits for a service to answer."""


class Settings(BaseSettings):
    """All of erc-stream's configuration. Frozen: build a new one to change anything."""

    # hide_input_in_errors: a validation error names the setting and what is wrong with it, never the value it was
    # given (a token, a password, a webhook URL); nested models' own flag does not apply when validated from here.
    model_config = SettingsConfigDict(
        env_prefix="ERC_", env_nested_delimiter="__", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    window: WindowSettings = WindowSettings()
    conversation: ConversationSettings = ConversationSettings()
    batch: BatchSettings = BatchSettings()
    model: ModelSettings = ModelSettings()
    vllm: VLLMSettings = VLLMSettings()
    store: StoreSettings = StoreSettings()
    data: DataSettings = DataSettings()
    services: ServicesSettings = ServicesSettings()
    delivery: DeliverySettings = DeliverySettings()
    metrics: MetricsSettings = MetricsSettings()
    alerts: AlertSettings = AlertSettings()
    dashboard: DashboardSettings = DashboardSettings()
    notify: NotifySettings = NotifySettings()
    export: ExportSettings = ExportSettings()
    tenancy: TenancySettings = TenancySettings()
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR.")
    log_json: bool = Field(False, description="JSON log lines (production) instead of a console rendering.")
    log_texts: bool = Field(
        False, description="Put message texts in DEBUG log lines. Off: logs carry ids, labels and reasons only.",
    )

    @model_validator(mode="after")
    def _check_retention(self) -> "Settings":
        if self.conversation.retain_turns < self.window.span:
            raise ValueError(f"conversation.retain_turns ({self.conversation.retain_turns}) must be >= window.size + "
                             f"window.hop - 1 ({self.window.span}): a window reads that many stored turns")
        return self

    @model_validator(mode="before")
    @classmethod
    def _read_moved(cls, data: Any) -> Any:
        """``window.retain`` and ``window.ttl_s`` moved to the ``conversation`` section (their old names still work)."""
        if not isinstance(data, dict) or not isinstance(data.get("window"), dict):
            return data
        window = dict(data["window"])
        moved = {new: window.pop(old) for old, new in (("retain", "retain_turns"), ("ttl_s", "ttl_s")) if old in window}
        if not moved:
            return data
        for new in moved:
            _deprecated(f"window.{'retain' if new == 'retain_turns' else new}", f"conversation.{new}")
        conversation = data.get("conversation")
        conversation = dict(conversation) if isinstance(conversation, dict) else {}
        return {**data, "window": window, "conversation": {**moved, **conversation}}

    def with_overrides(self, **sections: dict[str, object]) -> "Settings":
        """A copy with some fields of some sections replaced: ``s.with_overrides(kafka={"group_id": "g"})``."""
        # Validated like the environment is (model_copy alone would accept anything, typos included).
        update = {
            name: (section := type(getattr(self, name))).model_validate({**dict(getattr(self, name)),
                                                                        **section.upgrade(values)})
            for name, values in sections.items() if values
        }
        return self.model_copy(update=update)
