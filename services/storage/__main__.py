"""`python -m services.storage` runs the storage service."""

from services.storage.server import main

main()
