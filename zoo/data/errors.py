"""The one exception the data pipeline raises for bad input (a ValueError, so callers may catch either)."""


class DataError(ValueError):
    """Missing or empty data, a malformed document, a sequence longer than the data, or a tokenizer
    that does not fit the model. The message names the argument or file and what was expected."""
