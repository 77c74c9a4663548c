"""The DVC stages as library functions, one module each (dvc.yaml runs them through `covseg <stage>`).

Each `run()` takes its inputs, its outputs and only the params sections it reads, writes every output
whole or not at all, and returns what it wrote.
"""
