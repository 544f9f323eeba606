"""Transports: one Protocol (base.Transport), and a name-to-factory dict (registry)."""
