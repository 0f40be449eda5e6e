"""Evaluation of consolidated weights: bits per byte, multiple choice by log-likelihood, verifiable tasks.

`spec` parses `--task KIND:PATH[,key=value...]`; `bpb`, `choice` and `verifiable` score one task
kind each; `runner` shares the work between data-parallel ranks and reduces the sums by name, so one
rank and many give the same numbers. `minigpt.cli.eval` is the command (`launch/eval.py`).
"""
