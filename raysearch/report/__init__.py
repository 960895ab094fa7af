"""Report stage: Rich tables for the terminal. Never imports ray.
"""
