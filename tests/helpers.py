"""The test helpers live in the package (mixprec/testing.py) because `python -m mixprec selftest` uses them too."""
from mixprec.testing import (DTYPES, ODD_SIZES, assert_bitwise_equal, assert_close, random_grad,  # noqa: F401
                             special_values)
