"""The stacking engine: one module per job, composed by :class:`livestack.engine.core.Engine`.

Kept free of imports so that ``python -m livestack.engine.rebuild`` (the rebuild child)
loads only what it needs.
"""
