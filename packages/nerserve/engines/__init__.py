"""The runtimes: one `Engine` interface (base.py), one module per runtime, the batch cost model
(batching.py), and the choice of runtime for a checkpoint and machine (selection.py)."""
