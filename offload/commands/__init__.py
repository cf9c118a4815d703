"""The CLI and its commands (ask/generate/ingest, bench, cache, plan, profile), the demo, progress."""
