"""The processor's processing: running the engine on what delivery stored.

`committer.py` holds a PartitionEngine per owned partition, stores its outputs fenced by the
lease epoch, saves its checkpoints and acknowledges only what a saved checkpoint covers (the
commit order: docs/processor-checkpoints.md); `decode.py` turns queue entries into the engine's
events. Delivery acknowledges through the committer (a `deliverer.Fence`), and the source asks
it where re-reads start (`partitions.Processing`); `worker.py` wires them."""
