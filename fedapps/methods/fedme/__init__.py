"""FedMe, personalized FL by model exchange (../shared/spec/fedme.md; docs/fedme-tuning.md).

Server half: :mod:`.strategy` (the Flower Strategy and its pure algorithms) and :mod:`.server`
(initial architectures, rounds, final evaluation). Client half: :mod:`.client`.
"""

from fedapps.config import RunConfig
from fedapps.methods.fedme.client import local_best, train_mutual
from fedapps.methods.fedme.server import run_fedme
from fedapps.protocol.method import Method, require_clients, require_pool


def check_fedme(config: RunConfig, num_clients: int) -> None:
    """Every client needs a partner to exchange with, and the server a pool to cluster on."""
    require_clients("fedme", 2, num_clients)
    require_pool(config, "clusters the models")


METHOD = Method(run=run_fedme, handlers={("train", "mutual"): train_mutual}, setup=local_best,
                check=check_fedme)
