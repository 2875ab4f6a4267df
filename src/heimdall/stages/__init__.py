"""One module per DVC stage, each with a single ``run(...)`` entry point called by the CLI."""
