"""Typed configuration: one frozen model per component, combined into `MaceConfig`.

Values come from a TOML file (configs/*.toml), then `MACE_<SECTION>__<KEY>` environment variables,
then command-line flags. `MACE_CACHE_DIR` and `MACE_DATA_DIR` name the two directories.
A bad key or value fails at start with a message naming it.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mace.tenancy import SHARED, check_segment

ENV_PREFIX = "MACE_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    name: str = "builtin:smollm2"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on CUDA with bf16 and on CPUs with AMX or avx512_bf16, else float32"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int = Field(2048, ge=16)
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    linear_layout: Literal["auto", "standard", "transposed"] = Field(
        "auto", description="CPU: the GEMM layout of decode-sized batches; auto measures both at load")
    seed: int = 0


class EngineConfig(_Section):
    max_num_seqs: int = Field(64, ge=1, description="requests running at once")
    max_num_batched_tokens: int = Field(512, ge=16, description="prompt + decode tokens per step")
    overlap_streams: bool = Field(True, description="CUDA: training on a low-priority stream beside inference")
    cuda_graphs: bool = Field(True, description="CUDA: pure-decode steps replayed from graphs captured at start")
    train_thread: bool = Field(
        True, description="CPU: training stages on a thread of their own (half the cores) beside the serving forward")
    scheduling: Literal["slo", "fcfs"] = Field("slo", description="waiting order: earliest TTFT deadline, or arrival")
    shed_queue_depth: int = Field(
        4, ge=0, description="past this many waiting requests, one predicted to miss its TTFT gets 429"
    )


class MemoryConfig(_Section):
    """One budget for the KV cache, the training micro-batch's activations, the learner's optimizer
    state and the adapter versions held in memory; what the others need is carved out, the rest is KV."""

    budget_bytes: int = Field(2 * 1024**3, ge=1024**2, description="the whole budget")
    device_fraction: float = Field(
        0.0, ge=0, le=1, description="CUDA: this share of the device memory free after loading; 0: budget_bytes"
    )
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    prefix_caching: bool = Field(True, description="reuse the KV of prompt prefixes computed before")
    kv_pruning: bool = Field(False, description="prune long sequences' KV instead of preempting them")
    prune_seq_tokens: int = Field(0, ge=0, description="per-sequence KV budget in tokens; 0: prune only when short")
    prune_keep_ratio: float = Field(0.5, gt=0, lt=1, description="share of its KV kept when memory is short")
    prune_sink_tokens: int = Field(4, ge=0, description="first tokens always kept (attention sinks)")
    prune_recent_tokens: int = Field(32, ge=1, description="latest tokens always kept")


Scope = Literal["infer", "train", "admin", "act_for_users"]
SCOPES: tuple[Scope, ...] = ("infer", "train", "admin", "act_for_users")
DEFAULT_SCOPES: tuple[Scope, ...] = ("infer", "train")


class ApiKey(_Section):
    """One client key, stored as the sha256 hex digest of the secret; the secret itself is never kept."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = ""
    scopes: tuple[Scope, ...] = DEFAULT_SCOPES
    tenant: str | None = Field(None, description="the lineage this key's requests and samples use; "
                               "None: the key's name; \"\": the shared lineage (mace/tenancy.py)")
    requests_per_minute: float | None = Field(None, ge=0, description="overrides server.requests_per_minute")
    samples_per_minute: float | None = Field(None, ge=0, description="overrides server.samples_per_minute")

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, value: str | None) -> str | None:
        return value if value is None or value == SHARED else check_segment(value, "tenant")

    @property
    def display_name(self) -> str:
        return self.name or f"key-{self.sha256[:8]}"

    @property
    def tenant_name(self) -> str:
        """The lineage this key's requests use (mace/tenancy.py)."""
        return self.tenant if self.tenant is not None else self.display_name

    @model_validator(mode="after")
    def _name_can_be_tenant(self) -> ApiKey:
        if self.tenant == SHARED and "act_for_users" in self.scopes:
            # Its users' tenants would be bare user names, the same lineages as keys of those names.
            raise ValueError("a key of the shared lineage (tenant = \"\") cannot have the act_for_users scope")
        if self.tenant is None:
            try:
                check_segment(self.display_name, "key name")
            except ValueError as exc:
                raise ValueError(f"{exc}; or give the key a `tenant`") from None
        return self

    @classmethod
    def from_plain(cls, text: str) -> ApiKey:
        """`SECRET` or `SECRET:scope+scope` (the form MACE_SERVER__API_KEYS takes), hashed here."""
        secret, _, scopes = text.strip().partition(":")
        if len(secret) < 8:
            raise ValueError("a plain API key must have at least 8 characters")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        chosen = tuple(s.strip() for s in scopes.split("+")) if scopes else DEFAULT_SCOPES
        return cls.model_validate({"sha256": digest, "name": f"key-{digest[:8]}", "scopes": chosen})


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    served_model_name: str = ""
    max_body_bytes: int = Field(1024**2, ge=1024)
    default_max_tokens: int = Field(256, ge=1)
    max_output_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(0, ge=0, description="longest prompt accepted; 0: the model's context")
    max_waiting_requests: int = Field(256, ge=1)
    max_pending_feedback: int = Field(32, ge=1, description="feedback writes in flight before 429")
    ws_max_frame_bytes: int = Field(256 * 1024, ge=1024)
    ws_messages_per_s: float = Field(20.0, gt=0, description="per socket; the burst is twice this")
    # Authentication: hashed keys from the file, plain ones from MACE_SERVER__API_KEYS (hashed at load).
    api_keys: tuple[ApiKey, ...] = ()
    allow_unauthenticated: bool = Field(False, description="serve a non-loopback host without keys")
    requests_per_minute: float = Field(600.0, ge=0, description="per key; 0: unlimited")
    requests_burst: int = Field(60, ge=1)
    samples_per_minute: float = Field(6000.0, ge=0, description="feedback samples per key; 0: unlimited")
    samples_burst: int = Field(640, ge=1)
    max_streams_per_key: int = Field(16, ge=1, description="generations one key may run at once")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running streams may finish")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hash_plain_keys(cls, value: Any) -> Any:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        return tuple(ApiKey.from_plain(item) if isinstance(item, str) else item for item in items if item != "")


class SloTarget(_Section):
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)


INTERACTIVE = "interactive"


class SloConfig(_Section):
    """Latency targets by class. `ttft_s`/`tpot_s` are the `interactive` class's; `classes` adds others."""

    ttft_s: float = Field(1.0, gt=0)
    # People read 4-5 words a second: a stream slower than 5 tokens/s feels stuck, and training takes
    # whatever this target leaves beside decode, so it decides how a chat feels while mace learns.
    tpot_s: float = Field(0.2, gt=0)
    classes: dict[str, SloTarget] = Field(default_factory=lambda: {"batch": SloTarget(ttft_s=30.0, tpot_s=2.0)})
    default_class: str = INTERACTIVE

    def target(self, name: str) -> SloTarget:
        """Raises KeyError for a class that is not configured."""
        if name == INTERACTIVE:
            return SloTarget(ttft_s=self.ttft_s, tpot_s=self.tpot_s)
        return self.classes[name]

    @property
    def class_names(self) -> list[str]:
        return [INTERACTIVE, *self.classes]


class TrainConfig(_Section):
    policy: Literal["none", "periodic", "continuous", "mace"] = "mace"
    # per_tenant: what one user teaches is served to that user only (README, "Tenants"); requests
    # without a tenant share one lineage either way.
    tenancy: Literal["per_tenant", "shared"] = Field(
        "per_tenant", description="per_tenant: each tenant's feedback trains and serves its own adapter lineage"
    )
    # Each costs a few MB (a LoRA version, the learner's weights and AdamW moments) and one adapter slot
    # made at start (about 0.1 s on the default model on a CPU).
    max_resident_tenants: int = Field(16, ge=1, description="tenant lineages kept in memory; the idle others "
                                      "wait on disk until their next request or sample")
    # LoRA on q and v of every layer. On the MLP's down projection of the top layers it learns a taught
    # fact in fewer, cheaper steps, but goes on to answer unrelated questions with the fact (the
    # publish gate cannot see that): docs/results/train/learn.md, "Where the adapter sits".
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layer_fraction: float = Field(1.0, gt=0, le=1, description="share of the decoder layers, counted "
                                       "from the top, that get LoRA (the backward stops below them); 1: all")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW's learning rate once a lineage has settled "
                                 "(`fresh_lr_factor`)")
    # A lineage's first steps learn its users' first facts, where each step counts most (a tenant gets a
    # dozen steps in five minutes on a 2-core CPU); later steps, on a lineage that has learned much,
    # settle: at twice the rate throughout, the shared lineage of the drifting trace collapsed to empty
    # answers after about 70 steps (docs/results/train/learn.md, "A fresh lineage's learning rate").
    fresh_lr_factor: float = Field(2.0, ge=1, description="a lineage's first optimizer steps learn at this "
                                   "times learning_rate, easing to learning_rate over fresh_lr_steps; 1: constant")
    fresh_lr_steps: float = Field(32.0, gt=0, description="optimizer steps over which a lineage's learning rate "
                                  "eases (the extra falls by e each this many steps)")
    # One sample per optimizer step: AdamW's step has the same size whatever the batch, so on a machine
    # whose slack trains a few samples a second, smaller steps learn more per token, and a one-sample
    # micro-step fits the slack between serving steps more closely (docs/results/train/compare.md,
    # "Smaller, more frequent steps").
    batch_size: int = Field(1, ge=1, description="samples per optimizer step (gradient accumulation)")
    chunk_tokens: int = Field(64, ge=1, description="continuous policy: training tokens per iteration")
    idle_chunk_tokens: int = Field(512, ge=1, description="training tokens per iteration when nothing is served")
    max_sample_tokens: int = Field(512, ge=8)
    max_samples_per_request: int = Field(64, ge=1)
    periodic_interval_s: float = Field(60.0, gt=0)
    periodic_min_samples: int = Field(16, ge=1)
    periodic_steps: int = Field(4, ge=1, description="optimizer steps per periodic training round")
    replay_window: int = Field(256, ge=1)
    freshness_half_life_s: float = Field(600.0, gt=0)
    drift_full_ratio: float = Field(1.5, gt=1, description="mace: drift ratio at which training takes all slack")
    # Off by default: in bench-learn it kept 5 of 50 general answers against 1 without it, while costing a
    # quarter of training's tokens (docs/results/train/learn.md); a lever, not yet a guard.
    rehearsal: bool = Field(False, description="train one of the base model's own answers to a general question "
                            "with each optimizer step, against overwriting the rest")
    retention_guard: float = Field(
        0.4, ge=0, description="publish gate: hold back a candidate whose mean loss on the anchors (version 0's "
        "own answers to general questions, those the lineage's scope gives its versions) is this much higher than "
        "version 0's, per token; 0: off")
    # Lexical and per request (train/scope.py): in bench-learn a version that learned one fact changed
    # 48 of 50 greedy answers to unrelated questions when it answered every prompt.
    scope_similarity: float = Field(
        0.35, ge=0, le=1, description="a lineage's active version answers prompts whose words are at least this "
        "similar (IDF-weighted Jaccard) to a prompt it was taught; the others get version 0; 0: every prompt")
    converged_loss: float = Field(0.1, ge=0, description="mace: per-token loss the drift ratios add to both sides, "
                                  "so a version that already answers its users nearly surely rests")
    rest_after_held_back: int = Field(3, ge=1, description="mace: rest once the publish gate has held the "
                                      "learner back this many times in a row with no new sample meanwhile")
    heldout_every: int = Field(5, ge=2, description="at most one sample in N of a tenant's is held out for the "
                               "publish gate, and only one that repeats an answer its lineage is taught")
    heldout_size: int = Field(16, ge=1)
    heldout_half_life: float = Field(4.0, gt=0, description="publish gate: a held-out sample's weight halves "
                                     "this many samples back from the newest")
    heldout_untaught_weight: float = Field(
        0.25, gt=0, le=1, description="publish gate: the weight of a held-out sample whose question no training "
        "sample in the replay window answers, against 1 for one whose question is taught")
    publish_margin: float = Field(0.02, ge=0, lt=1)
    max_staleness_s: float = Field(300.0, gt=0)
    min_publish_interval_s: float = Field(10.0, ge=0, description="versions are not published more often")
    checkpoint_interval_s: float = Field(60.0, gt=0)
    max_versions_loaded: int = Field(3, ge=1)


class MaceConfig(_Section):
    # validate_default: the default directories must be expanded too (pydantic skips defaults otherwise)
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    memory: MemoryConfig = MemoryConfig()
    server: ServerConfig = ServerConfig()
    slo: SloConfig = SloConfig()
    train: TrainConfig = TrainConfig()
    cache_dir: Path = Path("~/.cache/mace")
    data_dir: Path = Path("~/.local/share/mace")

    @field_validator("cache_dir", "data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in ("cache_dir", "data_dir"):
            overrides[key] = value
        elif "__" in key:
            section, field = key.split("__", 1)
            overrides.setdefault(section, {})[field] = _list_or_scalar(value)
    return overrides


def _list_or_scalar(value: str) -> str | list[str]:
    """`a,b` in the environment sets a list-typed key (e.g. MACE_TRAIN__TARGET_MODULES=q_proj,v_proj)."""
    return [part.strip() for part in value.split(",")] if "," in value else value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        env = ENV_PREFIX + "__".join(str(part) for part in item["loc"]).upper()
        lines.append(f"{key} (env {env}): {item['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> MaceConfig:
    """File, then environment, then `overrides` (from flags), validated as one."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    data = _merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    data = _merge(data, overrides or {})
    try:
        return MaceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
