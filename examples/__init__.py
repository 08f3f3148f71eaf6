"""Examples, installed as mixprec.examples (run the training demo with `python -m mixprec demo`)."""
