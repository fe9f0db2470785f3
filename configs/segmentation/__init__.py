"""Semantic segmentation recipes: the ClusTR pyramid with a Semantic FPN head on ADE20K and
CamVid (``docs/segmentation.md``)."""
