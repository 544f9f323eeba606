"""The pure core: decides and renders; imports no Flask, SQLAlchemy, twilio, network or disk."""
