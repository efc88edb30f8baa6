"""Evaluation: metrics, paired statistics, per-round evaluation, longitudinal response, figures and the report."""
