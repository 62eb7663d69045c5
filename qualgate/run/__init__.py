"""Running a pipeline: the compound table, provenance (and, next, the runner loop)."""
