"""Versioned SQL migrations of the auth schema, applied by `streammesh.mesh.postgres.migrate`."""
