"""Frame handling around the model: sources, sinks, the stylizer stage, temporal smoothing, styles, the Python API.

    >>> from pipeline import Stylizer
    >>> stylizer = Stylizer(style="starry.jpg", working_size=256)
    >>> out = stylizer.stylize(frame)                       # HxWx3 uint8 RGB in, the same kind out

`Stylizer` is loaded on first use, so importing a pipeline module does not pull in the whole API.
"""

__all__ = ["Stylizer"]


def __getattr__(name):
    if name == "Stylizer":
        from pipeline.api import Stylizer

        return Stylizer
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
