"""Long Range Arena task configs (``docs/lra.md``)."""
