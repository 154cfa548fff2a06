"""Data: offline data sets (:mod:`.registry`), partitions (:mod:`.partition`) and the per-client
tensors every method trains on (:mod:`.federated`, the only module here that reads the run config).

Kept empty so that importing a data set's loader never imports the run configuration.
"""
