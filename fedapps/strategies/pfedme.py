"""pFedMe (Dinh et al., NeurIPS 2020): personalization through Moreau envelopes.

Client i keeps a local model w_i and computes a personalized model theta_i that minimises
f_i(theta; D) + lambda/2 ||theta - w_i||^2 (client side: :func:`fedapps.baselines_client.
train_pfedme`); the server averages the local models w_i and mixes the average into the global
model: w <- (1 - beta) w + beta * avg_i(w_i). Choices, following the FedMe paper where it speaks:

- Local rounds R: one per minibatch of ``local-epochs`` passes over the train split (the FedMe
  paper's E = 2 epochs for every method; pFedMe's R = 20 is tied to its tiny data sets), each with
  ``pfedme-inner-steps`` (K = 5, pFedMe's value) plain gradient steps on theta with
  ``pfedme-personal-lr``; the local-model step uses ``lr`` with momentum 0.9 and weight decay
  (the FedMe paper's SGD for every method; pFedMe's own update has no momentum).
- lambda = 15 (``pfedme-lambda``, pFedMe's MNIST value) and beta = 1 (``pfedme-beta``; pFedMe
  reports 1 and 2).
- Averaging weighted by train-set size (as pFedMe's code and FedAvg).
- Evaluated model: the PERSONALIZED theta_i from the client's last local round, not the local
  or global w (the authors' reference code tests the wrong model). The FedMe paper does not
  fine-tune pFedMe (its personal step plays that role), so the reported accuracy is before
  fine-tuning.
"""

from __future__ import annotations

from typing import Any

from fedapps.strategies.personal import run_shared_and_personal


def run_pfedme(grid, config, clients, recorder) -> dict[str, Any]:
    summary = run_shared_and_personal(grid, config, clients, recorder, "pfedme",
                                      mix=config.pfedme_beta)
    return {**summary, "reported": "before-finetune"}
