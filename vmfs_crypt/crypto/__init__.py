"""Cryptographic primitives: sector arithmetic, the XTS sector cipher and key wrapping."""
