"""Reports: records and summaries, merging shards, plots, the live view, repro scripts."""
