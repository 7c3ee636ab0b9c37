"""Training code and the exported models with their manifests (see docs/models.md)."""
