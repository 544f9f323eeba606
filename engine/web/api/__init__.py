"""The REST API under /api/v1 and its OpenAPI document: one module per resource, each with
a `blueprint` (registered by engine.web.create_app)."""
