"""Pure-PyTorch ML library used by the MedMaaS workers.

No Flask, Celery or database imports here: every function takes plain Python
objects, numpy arrays, tensors or file paths, so it can be tested in isolation.
"""
