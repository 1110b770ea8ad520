"""`python -m services.auth` runs one auth replica."""

from services.auth.server import main

main()
