"""`stepstream serve`: an OpenAI-compatible HTTP API over one loaded model.

requests (checking bodies) -> completion (one request on the model) -> engine (the queue and
the worker thread) -> shapes (OpenAI responses) -> app (the FastAPI routes).
"""
