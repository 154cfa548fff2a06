"""FML, Federated Mutual Learning (Shen et al., 2020): the FedMe paper's mutual-learning baseline.

Each client keeps a private local model; the server keeps one shared "meme" model. Every round
each client trains both on its train split by deep mutual learning (client side:
:func:`fedapps.baselines_client.train_fml`) and the server averages the meme models (FedAvg
weights). Choices where the papers leave room, following the FedMe paper where it says anything:

- Loss weights: FML's alpha = beta = 0.5 (``fml-alpha``, ``fml-beta``):
  L_local = a CE + (1 - a) KL(meme || local), L_meme = b CE + (1 - b) KL(local || meme).
- Both models use ``model`` (FML allows a different private architecture; one architecture
  keeps the comparison with the other baselines about the method, not the model).
- The private model starts as a copy of the initial meme model and is kept between rounds
  (relayed through the server so ClientApps stay stateless; see
  :mod:`fedapps.strategies.personal`).
- Evaluated model: the private local model. The FedMe paper does not list FML among the methods
  it fine-tunes, so the reported accuracy is before fine-tuning (the after-fine-tuning figure is
  in the summary too).
"""

from __future__ import annotations

from typing import Any

from fedapps.strategies.personal import run_shared_and_personal


def run_fml(grid, config, clients, recorder) -> dict[str, Any]:
    summary = run_shared_and_personal(grid, config, clients, recorder, "fml")
    return {**summary, "reported": "before-finetune"}
