"""The admin app for marketers, compliance reviewers and IT: one blueprint per area, all
under /admin, all behind engine.web.auth.requires."""
