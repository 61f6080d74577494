"""Evaluation: the head-to-head comparison (suite, compare), specialisation analyses, and its report (collect,
plots, report)."""
