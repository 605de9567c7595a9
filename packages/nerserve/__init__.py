"""nerserve: BEI-Bert-compatible token classification (NER) serving, with pipeline-exact answers."""

__version__ = "0.1.0"
