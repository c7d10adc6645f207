"""Domain: models, errors and services. No HTTP here."""
