"""Developer scripts; the Python ones run from the repository root as modules (``python -m scripts.<name>``).

Run that way, they import ``scripts.support_matrix`` (the support-matrix definitions the tests share) and the test
helpers without editing ``sys.path``.
"""
