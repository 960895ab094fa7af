"""Inference stage: a trained model or ensemble applied to images, anywhere: a notebook, a
Ray Serve replica, a script. Never imports ray, nor the train, search or ensemble stages.
"""
