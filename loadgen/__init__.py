"""loadgen: a locust-style, trace-driven load generator for mace and other OpenAI-compatible servers.

`python -m loadgen run --url ...` drives a running server; `python -m loadgen compare ...` starts one
server per retraining policy on the same drifting trace and writes a side-by-side report.
"""
