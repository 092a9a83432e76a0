"""Jinja model-card templates, shipped inside the package as `pmg.model_cards` (see pyproject.toml)."""
