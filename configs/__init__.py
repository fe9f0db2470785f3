"""Run configs: ``get_config(arg)`` files for the train loop, and their shared config-time code."""
