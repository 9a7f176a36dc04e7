"""Package data for charrnn: the registry of downloadable corpora (registry.json)."""
