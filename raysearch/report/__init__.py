"""Report stage: Rich tables for the terminal and the offline HTML report (html.py). Never imports
ray, train, search or ensemble.
"""
