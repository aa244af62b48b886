"""The test suite: ``tests/test_*.py`` (one file per module or callback; ``test_audit_*.py`` hold the reliability
audit), the shared fixtures in ``conftest.py`` and the shared helper modules in ``helpers/``.

A package, so test modules import their helpers as ``tests.helpers.<module>`` (pytest puts the repository root on
``sys.path``; processes spawned for DDP inherit it).
"""
