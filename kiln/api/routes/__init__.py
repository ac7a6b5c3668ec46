"""The render API's routes, one module per area."""
