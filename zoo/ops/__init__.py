"""Functional kernels: each fast op with its slow `_ref` twin beside it."""
