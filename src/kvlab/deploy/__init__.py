"""Deploy: serve profiles -> command line -> process lifecycle -> startup-log facts.

Public API (keep these names): ServeSpec, Server, choose_engine (launcher), StartupFacts,
parse_log, parse_cache_config_info (facts), profile / model_profiles (profiles).
"""

from kvlab.deploy.engines import choose_engine
from kvlab.deploy.facts import StartupFacts, parse_cache_config_info, parse_log
from kvlab.deploy.launcher import ServeSpec, Server, ServerStartError
from kvlab.deploy.profiles import ServeProfile, model_profiles, profile

__all__ = [
    "ServeProfile", "ServeSpec", "Server", "ServerStartError", "StartupFacts", "choose_engine",
    "model_profiles", "parse_cache_config_info", "parse_log", "profile",
]
