"""The object-recognition sequence: its config, tasks and trunks, run, and the ridge baseline."""
