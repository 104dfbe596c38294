"""adpo: adversarial robustness for LLaVA-family vision-language models by preference optimization.

The core package: LVLM adapter, threat model, attacks, objectives, losses, data sources, evaluation and
the bundled world. The stages (``pairs``, ``trainers``, ``transfer``) import it; it never imports them
except lazily from the ``adpo`` command line.
"""

__version__ = "0.1.0"
