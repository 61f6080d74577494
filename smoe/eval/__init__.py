"""Evaluation: metrics, and (later) the head-to-head comparison, specialisation analysis and reports."""
