"""The five StreamMesh services; each is its own process and meets the others only through the API."""
