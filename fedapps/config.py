"""Typed run configuration: one place for defaults, parsing and validation.

Flower hands every ServerApp and ClientApp a flat ``run_config`` of kebab-case keys
(``[tool.flwr.app.config]`` in pyproject.toml plus ``--run-config`` overrides). This module turns
it into a :class:`RunConfig` and rejects bad values *before* any training starts, with a message
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTITIONERS = ("iid", "dirichlet", "natural")
INIT_ARCH_MODES = ("local-best", "random")
CLUSTER_INPUTS = ("softmax", "logits")
WEIGHTINGS = ("uniform", "samples")
DEVICES = ("auto", "cpu", "cuda")
DISTILL_MODES = ("per-round", "continuous")
GLOBAL_TESTS = ("server", "clients")  # where the global model is tested (fedapps/distill)
# FedMe adoption (fedapps/tuning.py): loss (the paper), accuracy (ties keep the personal
# model), population (the paper's rule; structure changes only on the population's evidence)
ADOPTION_RULES = ("loss", "accuracy", "population")


class ConfigError(ValueError):
    """A run-config value that cannot work; raised before training starts."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Field names are the kebab-case keys with '-' -> '_'."""

    method: str = "fedme"
    dataset: str = "digits"
    data_path: str = ""
    partitioner: str = "dirichlet"
    partition_file: str = ""
    alpha_label: float = 0.5
    alpha_size: float = 10.0
    num_clients: int = 10
    unlabeled_size: int = -1  # -1: min(1000, 15% of the data), as the data allows
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    min_client_samples: int = 10
    model: str = "cnn2"
    candidate_models: str = "cnn1,cnn2,cnn3,cnn4"
    init_arch: str = "local-best"
    local_best_epochs: int = 30  # epoch budget per candidate for init-arch=local-best
    local_best_patience: int = 5  # early stopping: epochs without a better validation result
    local_best_pooling: float = 50.0  # pseudo-count shrinking local-best to all clients (0: paper)
    adoption_rule: str = "loss"  # FedMe: loss (the paper) | accuracy | population
    adoption_margin: float = 0.0  # how much better the exchange model must be to be adopted
    adoption_warmup: int = 0  # rounds in which only a model of the own architecture is adopted
    num_rounds: int = 20
    local_epochs: int = 2
    batch_size: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_norm: float = 10.0
    finetune_epochs: int = 2
    dml_temperature: float = 1.0
    dml_kl_weight: float = 1.0
    cluster_schedule: str = "paper"
    cluster_on: str = "softmax"
    kmeans_restarts: int = 10
    aggregation_weighting: str = "uniform"
    eval_every: int = 1
    seed: int = 0
    device: str = "auto"
    results_dir: str = "results"
    # real deployments: partial participation, faults, checkpoints (docs in README "Faults")
    fraction_train: float = 1.0  # share of clients that train each round
    min_replies: int = 1  # fewer usable replies than this: the round is skipped, not aggregated
    round_timeout: float = 3600.0  # seconds a phase waits for replies; late ones are left out
    checkpoint_every: int = 0  # save the server state every N rounds (0: never)
    run_name: str = ""  # fixed results folder <results-dir>/<run-name>; a restart resumes it
    fault_injection: str = ""  # testing: 'error|nan|slow:client:round,...' faults on purpose
    # asynchronous distillation (fedapps/distill; README). ``model`` is the small distilled
    # model the clients train, ``global-model`` the large one only the server holds.
    global_model: str = "cnn-large"
    distill_mode: str = "continuous"  # per-round | continuous (async-distill only)
    distill_epochs: int = 1  # epochs over the unlabeled pool per distillation pass
    distill_temperature: float = 2.0
    distill_lr: float = 0.01
    distill_delay: float = 0.0  # extra seconds per pass: simulates a slow distillation server
    distill_threads: int = 1  # torch threads of the distillation server; 0: torch's default
    final_passes: int = 1  # continuous mode: passes on the final model before stopping
    forward_distill_every: int = 0  # 0: never; sync: every N rounds; async: every N passes
    channel_backend: str = "directory"
    channel_dir: str = ""  # empty: <results folder>/channel (async-distill only)
    channel_timeout: float = 300.0  # seconds a server waits for the other before giving up
    target_accuracy: float = 0.9  # summary: first time the global model reaches it
    initial_forward_distill: int = 1  # 1: first small model = forward-distilled global (paper)
    global_test: str = "server"  # server: held-out share of its pool | clients: their tests
    global_test_fraction: float = 0.5  # share of the server pool held out to test the global
    snapshot_every_s: float = 2.0  # global-model snapshot grid (tested after the run); 0: passes
    # baselines (fedapps/strategies/{hypcluster,fml,pfedme,mapper}.py; README, "Comparing")
    hypcluster_k: int = 2  # number of global models (the FedMe paper's value)
    fml_alpha: float = 0.5  # FML: CE weight of the private model's loss (KL gets 1 - alpha)
    fml_beta: float = 0.5  # FML: CE weight of the shared (meme) model's loss
    pfedme_lambda: float = 15.0  # pFedMe: strength of the Moreau-envelope proximal term
    pfedme_inner_steps: int = 5  # pFedMe: gradient steps on theta per minibatch (K)
    pfedme_personal_lr: float = 0.05  # pFedMe: learning rate of those steps
    pfedme_beta: float = 1.0  # pFedMe: server mixing, w <- (1 - beta) w + beta avg(w_i)
    mapper_lambda_init: float = 0.5  # MAPPER: initial weight of the local parameters

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys; unknown keys are an error (typos must not pass)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                allowed = ", ".join(sorted(k.replace("_", "-") for k in known))
                raise ConfigError(f"unknown config key '{key}'; known keys: {allowed}")
            kwargs[name] = _coerce(key, value, known[name].type)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case view, as written to the results folder and sent to clients."""
        return {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> RunConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # ------------------------------------------------------------- derived views
    @property
    def candidates(self) -> list[str]:
        return [name.strip() for name in self.candidate_models.split(",") if name.strip()]

    def cluster_schedule_pairs(self) -> list[tuple[int, int]]:
        """[(first round, k), ...] sorted; 'paper' = 1 -> 2 -> 3 -> 4 at T/2, 3T/4, 0.9T."""
        if self.cluster_schedule == "paper":
            t = self.num_rounds
            pairs = [(1, 1), (t // 2 + 1, 2), (3 * t // 4 + 1, 3), (int(0.9 * t) + 1, 4)]
            deduped: dict[int, int] = {}
            for start, k in pairs:
                deduped[start] = k  # later entries win when T is tiny
            return sorted(deduped.items())
        pairs = []
        for item in self.cluster_schedule.split(","):
            try:
                start, k = (int(part) for part in item.split(":"))
            except ValueError:
                raise ConfigError(
                    f"cluster-schedule='{self.cluster_schedule}': expected 'paper' or "
                    "'round:k,round:k,...' (e.g. '1:1,10:2'); bad item "
                    f"'{item}'"
                ) from None
            if start < 1 or k < 1:
                raise ConfigError(
                    f"cluster-schedule='{self.cluster_schedule}': rounds and k must be >= 1"
                )
            pairs.append((start, k))
        return sorted(pairs)

    def faults(self) -> dict[tuple[int, int], str]:
        """``fault-injection`` as {(client, round): kind}; kinds: error, nan, slow."""
        faults = {}
        for item in filter(None, self.fault_injection.split(",")):
            try:
                kind, client, server_round = item.strip().split(":")
                faults[(int(client), int(server_round))] = kind
            except ValueError:
                kind = ""
            if kind not in ("error", "nan", "slow"):
                raise ConfigError(
                    f"fault-injection='{self.fault_injection}': bad item '{item}'; expected "
                    "'kind:client:round' with kind error, nan or slow"
                )
        return faults

    def clusters_at(self, server_round: int) -> int:
        k = 1
        for start, value in self.cluster_schedule_pairs():
            if server_round >= start:
                k = value
        return k

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        # Registries are imported here because they import this module.
        from fedapps.data.registry import DATASETS
        from fedapps.models import MODELS
        from fedapps.server import METHODS

        _one_of("method", self.method, tuple(METHODS))
        _one_of("dataset", self.dataset, tuple(DATASETS))
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        _one_of("cluster-on", self.cluster_on, CLUSTER_INPUTS)
        _one_of("aggregation-weighting", self.aggregation_weighting, WEIGHTINGS)
        _one_of("device", self.device, DEVICES)
        _one_of("adoption-rule", self.adoption_rule, ADOPTION_RULES)
        _one_of("model", self.model, tuple(MODELS))
        for name in self.candidates:
            _one_of("candidate-models", name, tuple(MODELS))
        if not self.candidates:
            raise ConfigError("candidate-models is empty; give at least one model name")
        self._validate_init_arch(tuple(MODELS))
        self._require(("alpha-label", "alpha-size", "lr", "dml-temperature", "round-timeout"),
                      lambda v: v > 0, "> 0")
        self._require(("num-clients", "num-rounds", "batch-size", "eval-every",
                       "kmeans-restarts", "min-replies"), lambda v: v >= 1, ">= 1")
        self._require(("local-epochs", "finetune-epochs", "local-best-epochs",
                       "min-client-samples", "momentum", "weight-decay", "clip-norm",
                       "dml-kl-weight", "checkpoint-every", "adoption-margin",
                       "local-best-pooling",
                       "adoption-warmup"), lambda v: v >= 0, ">= 0")
        self._require(("local-best-patience",), lambda v: v >= 1, ">= 1")
        self._require(("val-fraction", "test-fraction"), lambda v: 0 <= v < 1, "in [0, 1)")
        self._require(("fraction-train",), lambda v: 0 < v <= 1, "in (0, 1]")
        if self.run_name and ("/" in self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run-name='{self.run_name}': a plain folder name is expected")
        self.faults()
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"val-fraction + test-fraction = {self.val_fraction + self.test_fraction}: "
                "must be < 1 so that clients keep training data"
            )
        if self.unlabeled_size < -1:
            raise ConfigError(
                f"unlabeled-size={self.unlabeled_size}: must be -1 (automatic) or >= 0"
            )
        if self.data_path and not Path(self.data_path).exists():
            raise ConfigError(f"data-path='{self.data_path}': no such file or directory")
        if self.partition_file and not Path(self.partition_file).is_file():
            raise ConfigError(f"partition-file='{self.partition_file}': no such file")
        self.cluster_schedule_pairs()
        self._validate_distillation(tuple(MODELS))
        self._validate_baselines()

    def _validate_distillation(self, models: tuple[str, ...]) -> None:
        """Keys of the asynchronous distillation methods (checked for every run: cheap)."""
        from fedapps.distill.channel import CHANNELS

        _one_of("global-model", self.global_model, models)
        _one_of("distill-mode", self.distill_mode, DISTILL_MODES)
        _one_of("channel-backend", self.channel_backend, tuple(CHANNELS))
        self._require(("distill-temperature", "distill-lr", "channel-timeout"),
                      lambda v: v > 0, "> 0")
        self._require(("final-passes",), lambda v: v >= 1, ">= 1")
        self._require(("distill-epochs", "forward-distill-every", "distill-delay",
                       "distill-threads"), lambda v: v >= 0, ">= 0")
        self._require(("target-accuracy",), lambda v: 0 < v <= 1, "in (0, 1]")
        _one_of("global-test", self.global_test, GLOBAL_TESTS)
        self._require(("global-test-fraction",), lambda v: 0 < v < 1, "in (0, 1)")
        self._require(("snapshot-every-s",), lambda v: v >= 0, ">= 0")
        self._require(("initial-forward-distill",), lambda v: v in (0, 1), "0 or 1")
        if self.method in ("async-averaging", "async-distillation") and not self.channel_dir:
            raise ConfigError(
                f"method='{self.method}' runs one half of async-distill and needs channel-dir: "
                "the folder (on storage both servers can reach) the two halves share"
            )

    def _validate_baselines(self) -> None:
        """Keys of the paper's baselines (HypCluster, FML, pFedMe, MAPPER)."""
        self._require(("hypcluster-k", "pfedme-inner-steps"), lambda v: v >= 1, ">= 1")
        self._require(("pfedme-lambda", "pfedme-personal-lr", "pfedme-beta"),
                      lambda v: v > 0, "> 0")
        self._require(("fml-alpha", "fml-beta"), lambda v: 0 <= v <= 1, "in [0, 1]")
        if not 0 < self.mapper_lambda_init < 1:
            raise ConfigError(
                f"mapper-lambda-init={self.mapper_lambda_init}: must be in (0, 1) (the mixing "
                "weight is learned through a sigmoid, which never reaches 0 or 1)"
            )

    def _require(self, keys: tuple[str, ...], ok: Callable[[Any], bool], allowed: str) -> None:
        for key in keys:
            value = getattr(self, key.replace("-", "_"))
            if not ok(value):
                raise ConfigError(f"{key}={value}: must be {allowed}")

    def _validate_init_arch(self, models: tuple[str, ...]) -> None:
        if self.init_arch in INIT_ARCH_MODES:
            return
        names = [name.strip() for name in self.init_arch.split(",")]
        for name in names:
            if name not in models:
                raise ConfigError(
                    f"init-arch='{self.init_arch}': '{name}' is not a model; allowed: "
                    f"{', '.join(INIT_ARCH_MODES)}, one model name, or a comma-separated "
                    f"list of one model per client; models: {', '.join(models)}"
                )
        if len(names) > 1 and not self.partition_file and len(names) != self.num_clients:
            raise ConfigError(
                f"init-arch lists {len(names)} models but num-clients={self.num_clients}; "
                "give one model per client or a single name for all"
            )


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}='{value}' is not known; allowed: {', '.join(allowed)}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Accept what TOML and the Flower CLI give (ints for floats, numeric strings)."""
    kind = {"int": int, "float": float, "str": str}.get(str(annotation))
    if kind is None:
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a number")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {kind.__name__}") from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key}={value!r}: expected an integer")
    return number
