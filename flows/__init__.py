"""Prefect flows that orchestrate covseg's DVC pipeline and model registry (see flows.pipeline)."""
