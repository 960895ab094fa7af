"""Evaluation: metrics by image, study and group, with bootstrap intervals over patients.
Never imports ray.
"""
