"""Images: the templates sandboxes are cloned from, and what is known about each.

machined owns which images exist (``ListImages``, ``CloneImage``); :mod:`.catalog` owns
what set-up recorded about each one when it was built or imported (description,
version, contents, environment).
"""

from .catalog import IMAGE_NAME, Catalog, ImageEntry, ImageSource, parse_image_name

__all__ = ["IMAGE_NAME", "Catalog", "ImageEntry", "ImageSource", "parse_image_name"]
