"""Training the embedded tiny model on the built-in task (`python -m capa_export.training.train_tiny`)."""
