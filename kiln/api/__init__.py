"""HTTP dialects over the one canonical request: the render API first, others beside it."""
