"""The node side: the worker process that runs tasks and cells, started as ``python -m sky_jupyter.worker``."""
