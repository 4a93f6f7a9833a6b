"""Decoding I/O, above `common`: image, video and audio files -> arrays, and webdataset tar shards.
No model code; every package that reads media (curation, synthetic tasks, models, training) uses it."""
