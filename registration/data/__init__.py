"""Data sets, each built from files shipped in packages or generated procedurally, seeded."""
