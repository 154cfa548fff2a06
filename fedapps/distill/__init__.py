"""Asynchronous distillation FL (see the README): a distillation server holding the large
global model and an averaging server running FedAvg on the small distilled model, cooperating
through a model channel; plus the synchronous scheme they are measured against."""
