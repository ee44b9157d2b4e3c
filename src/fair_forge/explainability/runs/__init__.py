"""Dataset runs: sources, sinks, the record pipeline, the local and Ray engines, summaries."""
