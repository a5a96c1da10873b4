"""isobox: a Linux container engine on the Windows containers model.

One engine, one image, isolation chosen per container at run time. See docs/architecture.md.
"""

__version__ = "0.1.0"
