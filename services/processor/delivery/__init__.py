"""The processor's delivery: what it does with the entries the source read.

Grouping consecutive entries into StoreEvents calls (`grouping.py`), and the leading groups of
several partitions into one call (`across.py`); storing and acknowledging them in order
(`deliverer.py`); the storage client (`storage_client.py`); counting failed attempts and setting
poison entries aside (`dead_letters.py`). Of the source it knows only `deliverer.Fence` (is a
partition still held; the fenced acknowledgement) and imports none of it; `worker.py` wires the
two (tests/processor/test_layers.py keeps it so)."""
