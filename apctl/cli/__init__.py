"""The `apctl` command line: parses flags, calls the engine, prints. No engine logic lives here."""
