"""One module per pipeline stage; each exposes ``run(ctx) -> StageResult`` and runs on Ray."""
