"""Integrations of the spallm core with host libraries (shipped as ``spallm_plugins.integrations``).

Each subpackage imports the core and its host library; the core never imports these.
"""
