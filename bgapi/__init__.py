"""bgapi: poll HTTP APIs in the background of a FastAPI service and act on the results."""

__version__ = "0.1.0"
