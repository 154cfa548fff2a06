"""FedMe, personalized FL by model exchange (../shared/spec/fedme.md; docs/fedme-tuning.md).

Server half: :mod:`.strategy` (the Flower Strategy and its pure algorithms) and :mod:`.server`
(initial architectures, rounds, final evaluation). Client half: :mod:`.client`.
"""

from fedapps.methods.fedme.client import local_best, train_mutual
from fedapps.methods.fedme.server import run_fedme
from fedapps.protocol.method import Method

METHOD = Method(run=run_fedme, handlers={("train", "mutual"): train_mutual}, setup=local_best)
