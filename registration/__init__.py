"""Localize → segment → match: image matching with a query-conditioned SSD and a TPS STN."""
__version__ = "0.1.0"


def __getattr__(name):
    # lazy, so `python -m registration.train` does not import the whole pipeline
    if name in ("Pipeline", "Result"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Pipeline", "Result", "__version__"]
