"""fedapps: FedMe and asynchronous distillation federated learning on Flower."""

__version__ = "0.1.0"

from fedapps.compare import compare  # noqa: E402  (the module's name is rebound to the function)

__all__ = ["compare"]
