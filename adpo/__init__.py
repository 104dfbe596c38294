"""adpo: adversarial robustness for LLaVA-family vision-language models by preference optimization.

The core package: LVLM adapter, threat model, attacks, objectives, losses, data sources, evaluation and
the bundled world. The stages (``pairs``, ``trainers``, ``transfer``) import it; it never imports them
except lazily from the ``adpo`` command line.
"""

import logging

__version__ = "0.1.0"


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to ...Pil" warning.

    Harmless here: adpo resizes through either backend and snaps the result to the 8-bit grid itself
    (``adpo.preprocess.to_pixels``), so both give the same pixels. Only this message goes; the logger's others stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# The logger transformers emits it from (transformers/utils/import_utils.py, the lazy module's __getattr__).
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
