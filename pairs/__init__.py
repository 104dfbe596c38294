"""pairs: clean-chosen / adversarial-rejected preference data for AdPO.

``adpo pairs --config configs/pairs/world.yaml`` writes ``<output_dir>/dataset`` (a HF dataset),
``README.md`` (the dataset card) and ``summary.json``; :func:`load_pairs` opens the result.
"""

from pairs.config import PairsConfig
from adpo.pairs_format import FEATURES, load_pairs

__all__ = ["FEATURES", "PairsConfig", "load_pairs"]
