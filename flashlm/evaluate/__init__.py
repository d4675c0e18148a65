"""Evaluation tasks, one module each (lm, longrange, efficiency), shared metrics, and the report."""
