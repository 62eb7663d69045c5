"""MLflow tracking of finished runs: layout, plots, upload (idempotent), comparison with earlier runs."""
