"""adpo: adversarial robustness for LLaVA-family vision-language models by preference optimization.

The core package: LVLM adapter, threat model, attacks, objectives, losses, data sources, evaluation and
the bundled world. The stages (``pairs``, ``trainers``, ``transfer``) import it; it never imports them
except lazily from the ``adpo`` command line.
"""

import logging

__version__ = "0.1.0"


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to ...Pil" warning.

    Harmless here: adpo does its own pixel-space preprocessing (``adpo.preprocess.to_pixels``, which snaps either
    backend's output to the 8-bit grid), and the PIL backend is the classic processor the LLaVA checkpoints were
    preprocessed with. Only this message goes; the logger's other messages stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# The logger transformers emits it from (transformers/utils/import_utils.py, the lazy module's __getattr__).
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
