"""`nerserve tag INPUT -o OUTPUT`: a corpus through the model, in input order, each row exactly once,
resumable after any interruption.

Three ways to run the model behind one orchestration (run.py): a server or deployment over HTTP
(http_target.py, a light client that imports neither torch nor transformers), the engine in this process
(local_target.py), or actors on a Ray cluster (ray_target.py, which also holds the callable class for
`Dataset.map_batches`). Rows come from inputs.py, answers go out through outputs.py, whose progress
record resume.py keeps; progress.py draws the bar and the summary; cli.py is the command line."""
