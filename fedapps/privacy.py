"""Differential privacy's mechanics and accounting, with no Flower messages (docs/privacy.md).

What a client sends is clipped and noised by these functions; where they are applied is the
business of ``fedapps/protocol/dp.py`` (the client mod, the server's noised average).

- :func:`clip_update`: the update (sent minus received, over every array of a reply at once)
  scaled to L2 norm <= C, by Flower's own ``compute_clip_model_update``;
- :func:`add_gaussian_noise`: N(0, sd^2) on every entry, drawn from a seeded torch generator
  (Flower's ``add_gaussian_noise_inplace`` draws from NumPy's global generator, so runs would
  not repeat);
- the noise SD: central ``z C / m`` over an average of m clipped updates (Flower's
  ``compute_stdv``), local ``z 2C`` on one reply, since two data sets of one client can move its
  clipped update by up to 2C;
- :func:`epsilon_spent`: Renyi-DP accounting by Flower's ``RdpAccountant`` (Google's
  dp-accounting), no amplification by sampling: an upper bound however clients are sampled;
- :func:`noise_multiplier`: the run's z, given or calibrated to ``privacy.target-epsilon`` over
  ``num-rounds`` releases by dp-accounting's ``calibrate_dp_mechanism``;
- :class:`PrivacyLedger`: how many noised releases each party made, and the report.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedapps.config import RunConfig

NOISE_SD_KEY = "dp-noise-sd"  # a round record's field: the SD of the noise on its average
ACCOUNTANT = ("Renyi DP (Google's dp-accounting through flwr's RdpAccountant), Gaussian "
              "mechanism, no amplification by sampling")
NEIGHBOURS = {"central": "add or remove one client's data",
              "local": "any two data sets of one client"}


def clip_update(sent: Sequence[np.ndarray], received: Sequence[np.ndarray],
                clip_norm: float) -> list[np.ndarray]:
    """``sent`` moved back toward ``received`` until the update's L2 norm (over all arrays
    together) is at most ``clip_norm``; unchanged when it already is."""
    clipped = [np.array(array, copy=True) for array in sent]
    compute_clip_model_update(clipped, list(received), clip_norm)
    return clipped


def add_gaussian_noise(arrays: Sequence[np.ndarray], sd: float,
                       generator: torch.Generator) -> list[np.ndarray]:
    """Every entry plus N(0, sd^2), drawn from ``generator`` (same seed: same noise)."""
    return [
        (array + sd * torch.randn(array.shape, generator=generator, dtype=torch.float64).numpy()
         ).astype(array.dtype)
        for array in arrays
    ]


def central_noise_sd(config: RunConfig, count: int) -> float:
    """SD of the noise on an average of ``count`` updates, each clipped to C: z C / count."""
    return compute_stdv(noise_multiplier(config), config.privacy_clip_norm, count)


def local_noise_sd(config: RunConfig) -> float:
    """SD of the noise on one client's reply: z times its sensitivity 2C."""
    return noise_multiplier(config) * 2 * config.privacy_clip_norm


def noise_multiplier(config: RunConfig) -> float:
    """The run's z: ``privacy.noise-multiplier``, or the smallest z whose ``num-rounds``
    releases spend ``privacy.target-epsilon`` at ``privacy.delta``."""
    if not config.privacy_target_epsilon:
        return config.privacy_noise_multiplier
    return calibrated_noise(config.privacy_target_epsilon, config.num_rounds, config.privacy_delta)


@functools.lru_cache(maxsize=64)
def calibrated_noise(target_epsilon: float, releases: int, delta: float) -> float:
    """z such that ``releases`` Gaussian releases spend at most ``target_epsilon`` at ``delta``
    (every client computes the same z from the same config)."""
    import dp_accounting  # slow to import; only runs that ask for a target epsilon need it
    from dp_accounting import rdp

    def accountant() -> rdp.RdpAccountant:
        return rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)

    def releases_at(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases)

    return float(dp_accounting.calibrate_dp_mechanism(accountant, releases_at, target_epsilon,
                                                      delta))


def epsilon_spent(z: float, releases: int, delta: float, population: int) -> float:
    """Epsilon after ``releases`` Gaussian releases with noise multiplier ``z``, at ``delta``."""
    if releases == 0:
        return 0.0
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(GaussianPrivacyEvent(z, population, population), releases)
    return accountant.get_privacy_spent().epsilon


class PrivacyLedger:
    """The noised releases of a run: the server's averages (central DP) or each client's train
    replies (local DP, counted when the client is asked: an upper bound), and the report."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.releases: Counter[str] = Counter()

    def record_round(self, asked: Iterable[int], round_record: Mapping[str, Any]) -> None:
        """One round: the clients asked to train and the round's record."""
        if self.config.privacy_mode == "local":
            self.releases.update(str(pid) for pid in asked)
        elif self.config.privacy_mode == "central" and NOISE_SD_KEY in round_record:
            self.releases["server"] += 1

    def state_dict(self) -> dict[str, int]:
        return dict(self.releases)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.releases = Counter(state)

    def report(self) -> dict[str, Any] | None:
        """What was protected and what it cost (None: no privacy option was on)."""
        config = self.config
        secagg = {"secagg": config.privacy_secagg}
        if config.privacy_mode == "none":
            return {"mode": "none", **secagg} if config.privacy_secagg else None
        worst = max(self.releases.values(), default=0)
        z = noise_multiplier(config)
        return {
            "mode": config.privacy_mode,
            "epsilon": epsilon_spent(z, worst, config.privacy_delta, config.num_clients),
            "delta": config.privacy_delta,
            "releases": worst,  # central: noised averages; local: the most any client sent
            "noise-multiplier": z,
            "target-epsilon": config.privacy_target_epsilon or None,
            "clip-norm": config.privacy_clip_norm,
            "neighbouring": NEIGHBOURS[config.privacy_mode],
            "accountant": ACCOUNTANT,
            "covers": "the model arrays clients send; not their metrics (losses, accuracies, "
                      "sample counts, FedMe's adoption decision)",
            **secagg,
        }


def report_line(report: Mapping[str, Any]) -> str:
    """The end-of-run line, e.g. 'central DP: epsilon 3.98 at delta 1e-05 after 40 releases'."""
    secagg = "; SecAgg+: the server saw only sums" if report["secagg"] else ""
    if report["mode"] == "none":
        return f"no differential privacy (epsilon infinite){secagg}"
    return (f"{report['mode']} DP: epsilon {report['epsilon']:.3g} at delta {report['delta']:g} "
            f"after {report['releases']} releases (noise multiplier "
            f"{report['noise-multiplier']:.4g}, clip norm {report['clip-norm']:g}){secagg}")
