"""Training losses as pure tensor functions (AdPO's PIO and AIO, FARE, TeCoA, Sim-CLIP)."""
