"""Prompts: templates over the notebook's names (`templating`, `namespace`), registry prompts
rendered as data (`untrusted`), the MLflow Prompt Registry (`registry`), and the user's transforms
(`transforms`)."""
