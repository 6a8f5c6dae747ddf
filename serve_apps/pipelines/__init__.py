"""Pipelines: target-neutral code in the ingress that composes services through handles."""
