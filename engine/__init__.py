"""engage: compliance-aware patient engagement campaign engine."""
