"""Command-line entry points. `launch/*.py`, `data_tools/*.py` and the console scripts call their `main()`s."""
