"""The processor's delivery: what it does with the entries the source read.

Grouping consecutive entries into StoreEvents calls, and the leading groups of several
partitions into one call (`across.py`); the storage client (`storage_client.py`); counting
failed attempts and setting poison entries aside (`dead_letters.py`)."""
