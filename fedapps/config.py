"""The run configuration: one schema for defaults, types, ranges, meaning and validation.

Flower hands every ServerApp and ClientApp a flat ``run_config``: the keys of
``[tool.flwr.app.config]`` in pyproject.toml plus ``--run-config`` overrides, where a TOML table
``[tool.flwr.app.config.fedme]`` (or ``[fedme]`` in a conf file) becomes keys ``fedme.<key>``.
Shared keys sit at the top; each method's own keys sit in its section (:data:`METHOD_SECTIONS`).
:class:`RunConfig` declares every key once (pydantic; docs/config.md is generated from it by
``python -m fedapps.config``) and rejects, before any training starts and in one line naming the
key: unknown keys, values of the wrong type or out of range, and a non-default value of a key
the chosen method does not use.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from fedapps.data.registry import BUILT_IN, DATASETS, DataError
from fedapps.models import MODELS

PROJECT = Path(__file__).resolve().parent.parent
PATH_KEYS = ("data-path", "partition-file", "results-dir")  # made absolute for app processes
INIT_ARCH_MODES = ("local-best", "random", "spread")
ADOPTION_RULES = ("loss", "accuracy", "population")  # fedapps/tuning.py
SERVER_FAULT = -1  # fault-injection's client number for the ServerApp itself
ENGINE_METHODS = ("fedme", "fedavg", "hypcluster", "fml", "pfedme", "mapper")
DISTILL_METHODS = ("async-distill", "async-averaging", "async-distillation", "sync-distill")
# What each privacy option needs (docs/privacy.md says why the other methods cannot have it):
# central DP and SecAgg+ an averaging server, local DP clients that send only model updates.
CENTRAL_DP_METHODS = ("fedavg", *DISTILL_METHODS)
SECAGG_METHODS = CENTRAL_DP_METHODS
LOCAL_DP_METHODS = ("fedme", "fedavg", *DISTILL_METHODS)
# Every method (fedapps/registry.py implements each) -> the sections of keys it reads.
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "fedme": ("fedme", "privacy"),
    "fedavg": ("privacy",),
    "local": (),
    "centralized": (),
    "hypcluster": ("hypcluster",),
    "fml": ("fml",),
    "pfedme": ("pfedme",),
    "mapper": ("mapper",),
    **dict.fromkeys(DISTILL_METHODS, ("distill", "privacy")),
}
# Shared keys only some methods honour: the others reject a non-default value.
HONOURED_BY: dict[str, tuple[str, ...]] = {
    "checkpoint-every": ENGINE_METHODS,  # the distillation schemes resume from their channel
    "fraction-train": (*ENGINE_METHODS, "async-distill", "async-averaging", "sync-distill"),
}
METHOD_NAMES = tuple(METHOD_SECTIONS)
DATASET_NAMES = tuple(DATASETS)
MODEL_NAMES = tuple(MODELS)


class ConfigError(ValueError):
    """A run-config value that cannot work; raised before training starts."""


def method_uses(method: str, key: str) -> bool:
    """Whether ``method`` reads ``key`` (its sections' keys and the shared keys it honours)."""
    section = key.split(".", 1)[0] if "." in key else ""
    in_section = not section or section in METHOD_SECTIONS.get(method, ())
    return in_section and (key not in HONOURED_BY or method in HONOURED_BY[key])


def option(default: Any, doc: str, section: str = "", key: str = "", **constraints: Any) -> Any:
    """One config key: default, meaning, and range (pydantic constraints). A key in a method's
    ``section`` is written ``<section>.<key>``; shared keys are the attribute name in kebab-case."""
    alias = f"{section}.{key}" if section else None
    return Field(default, description=doc, alias=alias, json_schema_extra={"section": section},
                 **constraints)


class RunConfig(BaseModel):
    """Every knob of a run; attribute names are the keys' last part with '-' -> '_'."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    # ---------------------------------------------------------------- shared: data
    method: Literal[METHOD_NAMES] = option("fedme", "the method to run (docs/architecture.md)")
    dataset: Literal[DATASET_NAMES] = option(
        "digits", "data set (docs/data.md); 'devices': each SuperNode holds its own file")
    data_path: str = option("", "file or folder of the data set; empty: the packaged copy")
    partitioner: Literal["iid", "dirichlet", "natural"] = option("dirichlet", "client partition")
    partition_file: str = option("", "a saved partition (JSON); replaces the partitioner")
    alpha_label: float = option(0.5, "Dirichlet concentration of labels per client", gt=0)
    alpha_size: float = option(10.0, "Dirichlet concentration of client sizes", gt=0)
    num_clients: int = option(20, "number of clients (SuperNodes)", ge=1)
    unlabeled_size: int = option(-1, "server's unlabeled pool; -1: min(1000, 15% of data)",
                                 ge=-1)
    val_fraction: float = option(0.2, "share of each client's data for validation", ge=0, lt=1)
    test_fraction: float = option(0.2, "share of each client's data for testing", ge=0, lt=1)
    min_client_samples: int = option(10, "fewest samples a client may hold", ge=0)
    # -------------------------------------------------------------- shared: training
    model: Literal[MODEL_NAMES] = option("cnn2", "model (the small distilled one for distill)")
    num_rounds: int = option(40, "rounds", ge=1)
    local_epochs: int = option(2, "epochs per round on each client", ge=0)
    batch_size: int = option(20, "minibatch size", ge=1)
    lr: float = option(0.05, "SGD learning rate", gt=0)
    momentum: float = option(0.9, "SGD momentum", ge=0)
    weight_decay: float = option(1e-4, "SGD weight decay", ge=0)
    clip_norm: float = option(10.0, "gradient-norm clipping (0: off)", ge=0)
    finetune_epochs: int = option(2, "epochs of fine-tuning before the final test", ge=0)
    dml_temperature: float = option(1.0, "softmax temperature of mutual learning (FedMe, FML)",
                                    gt=0)
    eval_every: int = option(1, "test every N rounds (and the last)", ge=1)
    seed: int = option(0, "every random choice: same seed, same partition, same result")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: the GPU when there is one")
    results_dir: str = option("results", "where run folders are written")
    # ------------------------------------------------ shared: real deployments (docs/faults.md)
    fraction_train: float = option(1.0, "share of clients that train each round", gt=0, le=1)
    min_replies: int = option(1, "fewer usable replies than this: the round is skipped", ge=1)
    round_timeout: float = option(3600.0, "seconds a phase waits; late replies are left out",
                                  gt=0)
    checkpoint_every: int = option(0, "save the server state every N rounds (0: never)", ge=0)
    run_name: str = option("", "fixed results folder <results-dir>/<run-name>; restarts resume")
    fault_injection: str = option("", "testing: 'error|nan|slow:client:round,...' on purpose; "
                                  "'error:server:round' fails the ServerApp")

    # ------------------------------------------------------------ fedme (docs/fedme-tuning.md)
    candidate_models: str = option("cnn1,cnn2,cnn3,cnn4", "architectures auto-tuning may pick",
                                   "fedme", "candidate-models")
    init_arch: str = option("spread", "spread | local-best | random | a model | one per client",
                            "fedme", "init-arch")
    local_best_epochs: int = option(30, "epoch budget per candidate for local-best", "fedme",
                                    "local-best-epochs", ge=0)
    local_best_patience: int = option(5, "early stopping: epochs without a better validation",
                                      "fedme", "local-best-patience", ge=1)
    local_best_pooling: float = option(50.0, "pseudo-count shrinking local-best to all clients "
                                       "(0: the paper)", "fedme", "local-best-pooling", ge=0)
    adoption_rule: Literal[ADOPTION_RULES] = option("loss", "when the exchange model is adopted",
                                                    "fedme", "adoption-rule")
    adoption_margin: float = option(0.0, "how much better the exchange model must be", "fedme",
                                    "adoption-margin", ge=0)
    adoption_warmup: float = option(0.25, "share of num-rounds, from round 1, in which only the "
                                    "own architecture is adopted", "fedme", "adoption-warmup",
                                    ge=0, lt=1)
    dml_kl_weight: float = option(1.0, "weight of the KL term of mutual learning", "fedme",
                                  "dml-kl-weight", ge=0)
    cluster_schedule: str = option("paper", "'paper' (K 1->4) or 'round:k,...'", "fedme",
                                   "cluster-schedule")
    cluster_on: Literal["softmax", "logits"] = option("softmax", "model outputs k-means uses",
                                                      "fedme", "cluster-on")
    kmeans_restarts: int = option(10, "k-means++ restarts", "fedme", "kmeans-restarts", ge=1)
    cluster_pool_size: int = option(200, "pool samples the models are clustered on, drawn once "
                                    "(0: the whole pool)", "fedme", "cluster-pool-size", ge=0)
    aggregation_weighting: Literal["uniform", "samples"] = option(
        "uniform", "weights of eq. 8 averaging", "fedme", "aggregation-weighting")

    # ----------------------------------------------------------- distill (docs/async-distill.md)
    global_model: Literal[MODEL_NAMES] = option("cnn-large", "the large model the server holds",
                                                "distill", "global-model")
    distill_mode: Literal["per-round", "continuous"] = option(
        "continuous", "async-distill: distil once per round or continuously", "distill", "mode")
    distill_epochs: int = option(1, "epochs over the unlabeled pool per pass", "distill",
                                 "epochs", ge=0)
    distill_temperature: float = option(2.0, "distillation temperature", "distill",
                                        "temperature", gt=0)
    distill_lr: float = option(0.01, "distillation learning rate", "distill", "lr", gt=0)
    distill_delay: float = option(0.0, "extra seconds per pass (a slow server)", "distill",
                                  "delay", ge=0)
    distill_threads: int = option(1, "torch threads of the distillation server (0: default)",
                                  "distill", "threads", ge=0)
    final_passes: int = option(1, "continuous: passes on the final model", "distill",
                               "final-passes", ge=1)
    forward_distill_every: int = option(0, "accuracy recovery: forward-distil every N "
                                        "(0: never)", "distill", "forward-distill-every", ge=0)
    channel_backend: Literal["directory"] = option("directory", "how the two servers talk",
                                                   "distill", "channel-backend")
    channel_dir: str = option("", "channel folder (empty: <results folder>/channel)", "distill",
                              "channel-dir")
    channel_timeout: float = option(300.0, "seconds a server waits for the other", "distill",
                                    "channel-timeout", gt=0)
    target_accuracy: float = option(0.9, "summary: first time the global model reaches it",
                                    "distill", "target-accuracy", gt=0, le=1)
    initial_forward_distill: Literal[0, 1] = option(
        1, "1: the first small model is the forward-distilled global one (the paper)",
        "distill", "initial-forward-distill")
    global_test: Literal["server", "clients"] = option(
        "server", "test the global model on the server's held-out set or the clients' tests",
        "distill", "global-test")
    global_test_fraction: float = option(0.5, "share of the server pool held out for testing",
                                         "distill", "global-test-fraction", gt=0, lt=1)
    snapshot_every_s: float = option(2.0, "global-model snapshot grid in seconds (0: passes)",
                                     "distill", "snapshot-every-s", ge=0)
    snapshot_growth: float = option(
        0.0, "grid steps grow to this share of the time since the start (0: fixed steps)",
        "distill", "snapshot-growth", ge=0, lt=1)
    time_budget_s: float = option(
        0.0, "both servers stop this many seconds after the initial model (0: off; num-rounds "
        "stays an upper bound)", "distill", "time-budget-s", ge=0)
    validation_fraction: float = option(
        0.0, "share of the server's held-out set kept out of the test, for the adoption check",
        "distill", "validation-fraction", ge=0, lt=1)
    adoption_check: Literal["none", "validation"] = option(
        "none", "adopt every forward-distilled model, or only one more accurate than the current "
        "one on the validation split", "distill", "adoption-check")

    # ----------------------------------------------- the paper's baselines (docs/comparison.md)
    hypcluster_k: int = option(2, "number of global models", "hypcluster", "k", ge=1)
    fml_alpha: float = option(0.5, "CE weight of the private model's loss", "fml", "alpha",
                              ge=0, le=1)
    fml_beta: float = option(0.5, "CE weight of the shared (meme) model's loss", "fml", "beta",
                             ge=0, le=1)
    pfedme_lambda: float = option(15.0, "strength of the Moreau-envelope term", "pfedme",
                                  "lambda", gt=0)
    pfedme_inner_steps: int = option(5, "gradient steps on theta per minibatch (K)", "pfedme",
                                     "inner-steps", ge=1)
    pfedme_personal_lr: float = option(0.05, "learning rate of those steps", "pfedme",
                                       "personal-lr", gt=0)
    pfedme_beta: float = option(1.0, "server mixing w <- (1 - beta) w + beta avg(w_i)",
                                "pfedme", "beta", gt=0)
    mapper_lambda_init: float = option(0.5, "initial weight of the local parameters", "mapper",
                                       "lambda-init", gt=0, lt=1)

    # -------------------------------------------------------------- privacy (docs/privacy.md)
    privacy_mode: Literal["none", "central", "local"] = option(
        "none", "differential privacy: central (clients clip their update, the server noises the "
        "average) or local (each client clips and noises what it sends)", "privacy", "mode")
    privacy_noise_multiplier: float = option(
        1.0, "noise SD / sensitivity (central: the clip norm C of the sum; local: 2C, one reply)",
        "privacy", "noise-multiplier", ge=0)
    privacy_target_epsilon: float = option(
        0.0, "calibrate the noise to spend this epsilon over num-rounds (0: use noise-multiplier)",
        "privacy", "target-epsilon", ge=0)
    privacy_clip_norm: float = option(
        1.0, "L2 bound C on each reply's model update (sent minus received, all its models)",
        "privacy", "clip-norm", gt=0)
    privacy_delta: float = option(1e-5, "delta of the (epsilon, delta) guarantee; < 1/num-clients",
                                  "privacy", "delta", gt=0, lt=1)
    privacy_secagg: Literal[0, 1] = option(
        0, "1: Flower's SecAgg+: the server sees only the sum of the clients' models", "privacy",
        "secagg")
    privacy_secagg_shares: float = option(
        1.0, "SecAgg+: share of the round's clients each client's key is split among", "privacy",
        "secagg-shares", gt=0, le=1)
    privacy_secagg_threshold: float = option(
        0.5, "SecAgg+: share of those shares needed to unmask (more: safer, fewer dropouts)",
        "privacy", "secagg-threshold", gt=0, le=1)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(one_line(error, values)) from None

    # ------------------------------------------------------------------------ parsing
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """From Flower's flat keys, or TOML tables (``{"fedme": {...}}``) as tomllib reads them."""
        return cls(**flatten(values))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some attributes changed, validated again."""
        return RunConfig(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The flat keys, as written to the results folder and sent to clients."""
        return self.model_dump(by_alias=True)

    # -------------------------------------------------------------------- validation
    @model_validator(mode="before")
    @classmethod
    def _no_booleans(cls, values: Any) -> Any:
        for key, value in dict(values).items():
            if isinstance(value, bool):
                raise ConfigError(f"{key}={value!r}: expected a number or a string")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        self._privacy_is_possible()
        self._method_uses_every_key()
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"val-fraction + test-fraction = {self.val_fraction + self.test_fraction}: "
                "must be < 1 so that clients keep training data"
            )
        if self.run_name and ("/" in self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run-name='{self.run_name}': a plain folder name is expected")
        if self.data_path and self.dataset in BUILT_IN:
            raise ConfigError(f"data-path='{self.data_path}': dataset='{self.dataset}' is built in "
                              "and reads no file; for your own file use dataset='npz'")
        for key, path in (("data-path", self.data_path), ("partition-file", self.partition_file)):
            if path and not Path(path).exists():
                raise ConfigError(f"{key}='{path}': no such file or directory")
        self._devices_hold_the_data()
        self.faults()
        self.cluster_schedule_pairs()
        for name in self.candidates:
            if name not in MODELS:
                raise ConfigError(f"fedme.candidate-models: '{name}' is not a model; "
                                  f"allowed: {', '.join(MODELS)}")
        if not self.candidates:
            raise ConfigError("fedme.candidate-models is empty; give at least one model name")
        self._validate_init_arch()
        if self.method in ("async-averaging", "async-distillation") and not self.channel_dir:
            raise ConfigError(
                f"method='{self.method}' runs one half of async-distill and needs "
                "distill.channel-dir: the folder (on storage both servers reach) they share"
            )
        self._validate_distill()
        return self

    def _validate_distill(self) -> None:
        """Distillation keys that only work together."""
        if self.snapshot_growth and not self.snapshot_every_s:
            raise ConfigError(f"distill.snapshot-growth={self.snapshot_growth}: needs "
                              "distill.snapshot-every-s > 0 (the grid's first steps)")
        if self.validation_fraction and self.global_test == "clients":
            raise ConfigError(f"distill.validation-fraction={self.validation_fraction}: the "
                              "validation split is carved from the server's held-out set; use "
                              "distill.global-test='server'")
        if self.adoption_check == "none":
            return
        if self.method == "sync-distill":
            raise ConfigError("distill.adoption-check: method 'sync-distill' adopts every "
                              "forward-distilled model (the paper's baseline); use 'none'")
        if not self.forward_distill_every:
            raise ConfigError(f"distill.adoption-check='{self.adoption_check}' needs "
                              "distill.forward-distill-every > 0: no model is offered otherwise")
        if not self.validation_fraction:
            raise ConfigError(f"distill.adoption-check='{self.adoption_check}' needs "
                              "distill.validation-fraction > 0: the split it checks on")

    def _method_uses_every_key(self) -> None:
        """A key the method cannot honour is an error, not a silent no-op."""
        for name, field in type(self).model_fields.items():
            key = field.alias or name
            if not method_uses(self.method, key) and getattr(self, name) != field.default:
                raise ConfigError(f"{key}={getattr(self, name)!r}: method '{self.method}' "
                                  "does not use this key")

    def _privacy_is_possible(self) -> None:
        """Privacy options the method cannot give, and settings that give no privacy, are
        errors: a run must never look protected when it is not."""
        needs = {"privacy.mode='central'": (self.privacy_mode == "central", CENTRAL_DP_METHODS,
                                            "an averaging server"),
                 "privacy.mode='local'": (self.privacy_mode == "local", LOCAL_DP_METHODS,
                                          "clients that reply only with updates of the models "
                                          "they were sent"),
                 "privacy.secagg=1": (bool(self.privacy_secagg), SECAGG_METHODS,
                                      "an averaging server")}
        for setting, (wanted, methods, what) in needs.items():
            if wanted and self.method not in methods:
                raise ConfigError(f"{setting} is not possible with method '{self.method}': it "
                                  f"needs {what} (possible with: {', '.join(methods)}; "
                                  "docs/privacy.md)")
        self._privacy_keys_are_used()
        if self.privacy_mode != "none":
            self._differential_privacy_is_meaningful()
        if self.privacy_secagg and self.num_clients * self.fraction_train < 2:
            raise ConfigError(
                f"privacy.secagg=1 needs at least 2 clients in every round; num-clients x "
                f"fraction-train = {self.num_clients * self.fraction_train:g}")

    def _privacy_keys_are_used(self) -> None:
        """A privacy key set while its option is off would protect nothing: say so."""
        no_dp, no_secagg = self.privacy_mode == "none", not self.privacy_secagg
        unused = {"privacy_noise_multiplier": no_dp, "privacy_target_epsilon": no_dp,
                  "privacy_clip_norm": no_dp, "privacy_delta": no_dp,
                  "privacy_secagg_shares": no_secagg, "privacy_secagg_threshold": no_secagg}
        for name, off in unused.items():
            field, value = type(self).model_fields[name], getattr(self, name)
            if off and value != field.default:
                switch = "privacy.secagg=0" if "secagg" in name else "privacy.mode='none'"
                raise ConfigError(f"{field.alias}={value!r} has no effect with {switch}")

    def _differential_privacy_is_meaningful(self) -> None:
        mode = f"privacy.mode='{self.privacy_mode}'"
        default_noise = type(self).model_fields["privacy_noise_multiplier"].default
        if self.privacy_target_epsilon and self.privacy_noise_multiplier != default_noise:
            raise ConfigError("privacy.noise-multiplier and privacy.target-epsilon both set; give "
                              "one (the noise follows from the target epsilon)")
        if not self.privacy_target_epsilon and self.privacy_noise_multiplier == 0:
            raise ConfigError(f"privacy.noise-multiplier=0 with {mode} adds no noise (epsilon is "
                              "infinite); give a positive value or privacy.target-epsilon")
        if self.privacy_delta * self.num_clients >= 1:
            raise ConfigError(
                f"privacy.delta={self.privacy_delta:g} >= 1/num-clients = "
                f"{1 / self.num_clients:g}: such a delta allows revealing a whole client; "
                "choose one well below it")

    def _devices_hold_the_data(self) -> None:
        """``dataset = "devices"``: no partition, and nothing on the server needs client data."""
        if self.dataset != "devices":
            return
        if not self.data_path:
            raise ConfigError("dataset='devices' needs data-path: the server's file (server.npz "
                              "from python -m fedapps.data.split)")
        if self.partition_file:
            raise ConfigError("partition-file: dataset='devices' has no partition; each device "
                              "holds its own file")
        if self.method == "centralized":
            raise ConfigError("method='centralized' pools every client's data on one node, which "
                              "dataset='devices' cannot do")
        if self.global_test == "clients" and method_uses(self.method, "distill.global-test"):
            raise ConfigError("distill.global-test='clients' needs the clients' test sets on the "
                              "server; with dataset='devices' use 'server'")

    def _validate_init_arch(self) -> None:
        if self.init_arch in INIT_ARCH_MODES:
            return
        names = [name.strip() for name in self.init_arch.split(",")]
        for name in names:
            if name not in MODELS:
                raise ConfigError(
                    f"fedme.init-arch='{self.init_arch}': '{name}' is not a model; allowed: "
                    f"{', '.join(INIT_ARCH_MODES)}, one model name, or a comma-separated "
                    f"list of one model per client; models: {', '.join(MODELS)}"
                )
        if len(names) > 1 and not self.partition_file and len(names) != self.num_clients:
            raise ConfigError(
                f"fedme.init-arch lists {len(names)} models but num-clients="
                f"{self.num_clients}; give one model per client or a single name for all"
            )

    # ------------------------------------------------------------------ derived views
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
                    f"fedme.cluster-schedule='{self.cluster_schedule}': expected 'paper' or "
                    f"'round:k,round:k,...' (e.g. '1:1,10:2'); bad item '{item}'"
                ) from None
            if start < 1 or k < 1:
                raise ConfigError(f"fedme.cluster-schedule='{self.cluster_schedule}': rounds "
                                  "and k must be >= 1")
            pairs.append((start, k))
        return sorted(pairs)

    def clusters_at(self, server_round: int) -> int:
        k = 1
        for start, value in self.cluster_schedule_pairs():
            if server_round >= start:
                k = value
        return k

    def faults(self) -> dict[tuple[int, int], str]:
        """``fault-injection`` as {(client, round): kind}; kinds: error, nan, slow. The server
        is client :data:`SERVER_FAULT` (``error:server:R``: the ServerApp fails in round R)."""
        faults = {}
        for item in filter(None, self.fault_injection.split(",")):
            try:
                kind, client, server_round = item.strip().split(":")
                who = SERVER_FAULT if client == "server" else int(client)
                faults[(who, int(server_round))] = kind
            except ValueError:
                kind = who = ""
            if kind not in ("error", "nan", "slow") or (who == SERVER_FAULT and kind != "error"):
                raise ConfigError(
                    f"fault-injection='{self.fault_injection}': bad item '{item}'; expected "
                    "'kind:client:round' with kind error, nan or slow, or 'error:server:round'"
                )
            if who == SERVER_FAULT and self.method not in ENGINE_METHODS:
                raise ConfigError(f"fault-injection='{self.fault_injection}': 'error:server' "
                                  f"needs a round-engine method, not '{self.method}'")
        return faults


# ---------------------------------------------------------------------------- messages


def one_line(error: ValidationError, values: Mapping[str, Any]) -> str:
    """The first problem of a pydantic error as ``key=value: what is allowed``."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    field = field_of(key)
    key = field.alias if field and field.alias else key
    kind, context = first["type"], first.get("ctx", {})
    value = first.get("input")
    if kind == "value_error":
        return str(context.get("error", first["msg"]))
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'; known keys: {', '.join(sorted(all_keys()))}"
    if kind == "literal_error":
        allowed = get_args(field.annotation) if field else ()
        return (f"{key}={value!r} is not known; allowed: "
                f"{', '.join(str(a) for a in allowed)}")
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}",
              "less_than": "< {lt}", "less_than_equal": "<= {le}"}
    if kind in bounds:
        limits = {name: f"{limit:g}" for name, limit in context.items()}
        meaning = f" ({field.description})" if field and field.description else ""
        return f"{key}={value!r}: must be {bounds[kind].format(**limits)}{meaning}"
    expected = {"int": "an integer", "float": "a number", "string": "a string"}
    for prefix, wanted in expected.items():
        if kind.startswith(prefix):
            return f"{key}={value!r}: expected {wanted}"
    return f"{key}={value!r}: {first['msg']}"


def field_of(key: str) -> FieldInfo | None:
    for name, field in RunConfig.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def all_keys() -> list[str]:
    return [field.alias or name for name, field in RunConfig.model_fields.items()]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"fedme": {"init-arch": "x"}}`` -> ``{"fedme.init-arch": "x"}`` (as Flower does)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------- files and commands


def app_defaults(project: Path = PROJECT) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml, flattened."""
    with (project / "pyproject.toml").open("rb") as stream:
        return flatten(tomllib.load(stream)["tool"]["flwr"]["app"]["config"])


def resolve(config_file: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults < config file < overrides, checked, with paths made absolute for the apps."""
    values = app_defaults()
    if config_file:
        try:
            with open(config_file, "rb") as stream:
                values.update(flatten(tomllib.load(stream)))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config file '{config_file}': {error}") from None
    values.update(flatten(overrides))
    RunConfig.from_mapping(values)  # fail here, before Flower starts, on a bad config
    for key in PATH_KEYS:
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return values


def parse_override(item: str) -> tuple[str, Any]:
    """``--set key=value`` with the value read as TOML (bare strings need no quotes)."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got '{item}'")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


class CommandLine(argparse.ArgumentParser):
    """The commands' argument parser: a bad argument is one line on stderr and exit status 2,
    like every other bad input (argparse prints its usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def run_command(main: Callable[[], int]) -> NoReturn:
    """Every command's entry point (``if __name__ == "__main__"``). SIGTERM (`kill`, `timeout`)
    becomes SystemExit, so the command leaves through the ``finally`` blocks and context managers
    that stop the Flower processes it started: by default it would die alone and leave the
    SuperLink, the simulation and Ray running. Then exits with ``main``'s status."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(exit_on_bad_input(main))


def exit_on_bad_input(main: Callable[[], int]) -> int:
    """Run a command's ``main``: a bad config or data path prints one line and exits with 2;
    a real bug keeps its traceback."""
    try:
        return main()
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def markdown_table() -> str:
    """docs/config.md: every key with its default and meaning, grouped by section."""
    lines = ["# Configuration keys", "",
             "Generated by `python -m fedapps.config > docs/config.md` from `fedapps/config.py`; "
             "`tests/test_config.py` checks that they agree. Shared keys first, then one "
             "section per method (`[tool.flwr.app.config.<section>]` in pyproject.toml, "
             "`[<section>]` in a conf file, `<section>.<key>` with `--set`). A method rejects a "
             "non-default value of a key it does not use.", ""]
    current = None
    for name, field in RunConfig.model_fields.items():
        section = field.json_schema_extra["section"] or "shared"
        if section != current:
            used_by = [m for m, s in METHOD_SECTIONS.items() if section in s] or ["every method"]
            lines += ["", f"## {section}", "", f"Used by: {', '.join(used_by)}.", "",
                      "| key | default | meaning |", "|---|---|---|"]
            current = section
        key = field.alias or name
        note = (f" (only {', '.join(HONOURED_BY[key])})" if key in HONOURED_BY else "")
        lines.append(f"| `{key}` | `{field.default!r}` | {field.description}{note} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(description="Print docs/config.md.").parse_args(argv)
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
