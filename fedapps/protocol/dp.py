"""Differential privacy in Flower messages (docs/privacy.md): the client mod and the server's
noised average. The arithmetic is :mod:`fedapps.privacy`'s.

Client (:func:`privacy_mod`, on every train handler, ``fedapps/client.py``):

- ``privacy.mode = "central"``: Flower's own ``fixedclipping_mod`` clips the reply's update to
  the clip norm the server put in the message (as Flower's ``DifferentialPrivacyClientSide
  FixedClipping`` wrapper does); the server adds the noise (:class:`CentralNoise`);
- ``privacy.mode = "local"``: every array record of the reply is clipped, jointly, against the
  record of the same name the client was sent, then noised with a generator seeded by (run seed,
  round, client). This covers FedMe's two models (its own and the one trained for the exchange
  partner), which Flower's ``LocalDpMod`` refuses (it takes one record and draws unseeded noise).

Server (:class:`CentralNoise`, used by :class:`fedapps.methods.fedavg.RecordedFedAvg`): the
uniform mean of the clipped updates plus N(0, (z C / m)^2), seeded by (run seed, round), before
anything else (the distillation server, the next round's clients) sees the average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedapps import privacy, training
from fedapps.config import RunConfig
from fedapps.protocol.messages import run_config_of
from fedapps.protocol.node import generator, partition_id


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip (central DP) or clip and noise (local DP) the models a train reply sends."""
    config = run_config_of(msg.content)
    if config.privacy_mode == "central":
        return fixedclipping_mod(msg, context, call_next)
    if config.privacy_mode == "local":
        return _local_dp(msg, context, call_next, config)
    return call_next(msg, context)


def _local_dp(msg: Message, context: Context, call_next: ClientAppCallable,
              config: RunConfig) -> Message:
    received = {name: record.to_numpy_ndarrays() for name, record in
                msg.content.array_records.items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    records = dict(reply.content.array_records)
    unmatched = [name for name in records if name not in received]
    if unmatched:
        raise ValueError(f"local DP: the reply's arrays {unmatched} answer no arrays the client "
                         "was sent, so there is no update to clip")
    sent = [array for record in records.values() for array in record.to_numpy_ndarrays()]
    reference = [array for name in records for array in received[name]]
    server_round = int(msg.content["config"]["server-round"])
    private = privacy.add_gaussian_noise(
        privacy.clip_update(sent, reference, config.privacy_clip_norm),
        privacy.local_noise_sd(config),
        generator(config, "local-dp", server_round, partition_id(context, config)),
    )
    arrays = iter(private)
    for name, record in records.items():
        reply.content[name] = ArrayRecord({key: Array(next(arrays)) for key in record})
    return reply


@dataclass(frozen=True)
class CentralNoise:
    """Central DP on an averaging server: clients clip (the server tells them C), the server
    averages uniformly (sample-count weights would let one client move the average by more than
    C / m) and adds the noise."""

    config: RunConfig

    def ask_clients_to_clip(self, train_config: ConfigRecord) -> None:
        """Flower's protocol: the clip norm travels in the train message's config record."""
        train_config[KEY_CLIPPING_NORM] = self.config.privacy_clip_norm

    def noised_mean(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, float]:
        """The uniform mean of the replies' arrays plus the noise; and the noise's SD."""
        mean = training.average_states(
            [reply.content["arrays"].to_torch_state_dict() for reply in replies])
        names = list(mean)
        sd = privacy.central_noise_sd(self.config, len(replies))
        noised = privacy.add_gaussian_noise([mean[name].numpy() for name in names], sd,
                                            generator(self.config, "central-dp", server_round))
        return ArrayRecord({name: Array(np.asarray(array)) for name, array in
                            zip(names, noised)}), sd


def central_noise(config: RunConfig) -> CentralNoise | None:
    """The averaging server's noise, when ``privacy.mode = "central"``."""
    return CentralNoise(config) if config.privacy_mode == "central" else None
