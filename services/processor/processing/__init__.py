"""Running the engine on what delivery stored: a PartitionEngine per owned partition, its
checkpoints and the commit order (docs/processor-checkpoints.md)."""
