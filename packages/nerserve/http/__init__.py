"""A front-end worker process: the HTTP routes, their middleware and body limits, the page at /ui, and
the worker's side of the link to the engine process. Imports nothing of the engine side and never torch
or transformers (rule tests hold both)."""
