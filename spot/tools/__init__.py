"""Command-line tools behind `python -m spot`: bench, chaos, report, emulate, goodput, list,
verify."""
