"""The developer tooling behind `python -m mixprec info | bench | inspect | selftest | demo`, kept apart from the
library: nothing in mixprec's library modules imports from here (only the lazy mixprec.info())."""
