"""transfer: graft a (robust) CLIP vision encoder into a LLaVA-family LVLM, convert formats, verify.

Modules: ``openclip`` (open_clip <-> HF CLIPVisionModel), ``geometry`` (donor/target compatibility checks
and explicit fixes), ``graft`` (replace the tower and save a complete model directory with a report),
``verify`` (embedding cosine, answer agreement, optional robust accuracy), ``realign`` (optional
projector-only fine-tune), ``cli`` (``adpo transfer``).
"""
