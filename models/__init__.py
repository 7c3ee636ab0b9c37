"""Training code and the exported models with their manifests (see README "Models")."""
