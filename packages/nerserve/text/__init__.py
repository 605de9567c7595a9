"""The host's half of a request, before and after the engine: tokenization into windows, aggregation of
the engine's scores into the pipeline's items. Imports nothing of the engine side (a rule test holds it)."""
