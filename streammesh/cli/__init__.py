"""The `streammesh` command line."""
