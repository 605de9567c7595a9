"""The engine process: its core (the checkpoint, the engine, the one scheduler) and the links that feed
it every worker's requests through shared memory."""
