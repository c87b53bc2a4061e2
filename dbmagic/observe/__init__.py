"""Observation: MLflow traces of every call (`tracing`, a subscriber of the call layer) and judges
of the answers a batch or a comparison already has (`judging`)."""
