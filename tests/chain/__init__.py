import pytest

# chains.py holds the contract assertions shared by the chain and ops tests.
pytest.register_assert_rewrite("tests.chain.chains")
