"""Batch editing: `dpl batch` runs a job file of images and edits, resumably, here, on local
worker processes or on a Ray cluster (`jobs`: the file; `run`: jobs, records and summaries;
`executors`: where the work runs, shared with the benchmark)."""
