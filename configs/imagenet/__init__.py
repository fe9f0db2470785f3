"""ImageNet recipes of DeiT, ClusTR and Sparsifiner (``docs/vision.md``)."""
