"""fedapps: FedMe and asynchronous distillation federated learning on Flower.

Layers, each importing only those below it (docs/architecture.md): ``config``, ``data`` and
``models``; ``training`` and ``tuning``; ``protocol`` (messages, the round engine, results);
``methods``; ``registry``; ``server`` and ``client``; tools (``launch``, ``deploy``, ``compare``,
``simulation``, ``inprocess``). The comparison API is :func:`fedapps.compare.compare`.
"""

__version__ = "0.1.0"
